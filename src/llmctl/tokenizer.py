"""The tokenizer: byte-level BPE trained with Hugging Face `tokenizers`, saved in HF form.

What it is:
- Pre-tokenization splits text with a GPT-4 style regex (words with their leading space or
  punctuation, runs of whitespace the modern way) in which digits form groups of at most two, as
  nanochat chose ("2 is the sweet spot" at a 32K vocabulary; ours defaults to 8K, so spending
  few tokens on digit groups matters more). Pieces are then mapped to bytes (ByteLevel with
  `use_regex=False`), and the initial alphabet is all 256 bytes: there is no unknown token.
- Special tokens have fixed ids 0..7 (`SPECIAL_TOKENS`), whatever the vocabulary size, so the
  data, model and chat code can use the constants below.
- `save_tokenizer` writes `tokenizer.json` + `tokenizer_config.json` so that
  `transformers.AutoTokenizer.from_pretrained(dir)` loads it with the same ids and the same chat
  template (`CHAT_TEMPLATE`, rendered in Python by `render_chat` with the same jinja2 settings).
- Text is made valid before encoding (`clean_text`): lone surrogates become U+FFFD, never a
  crash; `decode(tok, encode(tok, x)) == x` for any valid text.

Corpus encoding treats a literal "<|eos|>" inside a document as plain text
(`plain_text_tokenizer`), so the only special ids in token shards are the ones llmctl puts there.

Example:
    tok = train_tokenizer(texts, vocab_size=8192)
    save_tokenizer(tok, Path("out/tok"), model_max_length=2048)
    tok = load_tokenizer(Path("out/tok"))            # a dir, a tokenizer.json, or an artifact
    ids = encode(tok, "Hello world")
    prompt = render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from llmctl.errors import UsageError

BOS, EOS, PAD, MASK = "<|bos|>", "<|eos|>", "<|pad|>", "<|mask|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD, MASK, SYSTEM, USER, ASSISTANT, END)
BOS_ID, EOS_ID, PAD_ID, MASK_ID, SYSTEM_ID, USER_ID, ASSISTANT_ID, END_ID = range(8)
CHAT_ROLES = ("system", "user", "assistant")
# Smallest useful vocabulary: the special tokens plus the 256 byte tokens.
MIN_VOCAB = len(SPECIAL_TOKENS) + 256

# GPT-4's split pattern with digit groups of 1-2 (nanochat); Oniguruma syntax as tokenizers uses.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)

# One template string, used by transformers (`apply_chat_template`) and by `render_chat`.
# A conversation starts with <|bos|>; each turn is <|role|>content<|end|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat role must be system, user or assistant, not ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """`text` with lone surrogates (the only code points UTF-8 cannot hold) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATES.sub("\ufffd", text)
    return text


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE tokenizer with llmctl's pre-tokenizer and decoder."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    length: int | None = None,
    show_progress: bool = False,
) -> Tokenizer:
    """Train byte-level BPE on `texts`; special tokens get ids 0..7, the 256 bytes 8..263.

    The result may hold fewer than `vocab_size` tokens when the text has too few repeated
    pairs. `length` (the number of texts) only feeds the progress bar.
    """
    if vocab_size < MIN_VOCAB + 1:
        raise UsageError(f"vocab_size must be at least {MIN_VOCAB + 1} (got {vocab_size})")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok.train_from_iterator((clean_text(t) for t in texts), trainer=trainer, length=length)
    check_special_tokens(tok, "trained tokenizer")
    return tok


def check_special_tokens(tok: Tokenizer, where: str) -> None:
    """Raise UsageError unless every llmctl special token has its fixed id."""
    for want, token in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(token)
        if got != want:
            found = "missing" if got is None else f"id {got}"
            raise UsageError(
                f"{where}: not an llmctl tokenizer ({token} must be id {want}, is {found})"
            )


def check_fits(tok: Tokenizer, vocab_size: int, where: str) -> None:
    """Raise UsageError when the tokenizer can emit ids the model has no embedding row for."""
    if tok.get_vocab_size() > vocab_size:
        raise UsageError(
            f"{where}: tokenizer has {tok.get_vocab_size()} tokens but the model embeds only "
            f"{vocab_size}; they were not built together"
        )


def plain_text_tokenizer(tok: Tokenizer) -> Tokenizer:
    """A copy of `tok` that encodes special-token strings found in text as ordinary text."""
    copy = Tokenizer.from_str(tok.to_str())
    copy.encode_special_tokens = True
    return copy


def encode(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` (made valid first); no special tokens are added."""
    return tok.encode(clean_text(text), add_special_tokens=False).ids


def encode_batch(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, computed in Rust (threaded unless TOKENIZERS_PARALLELISM=false)."""
    encs = tok.encode_batch_fast([clean_text(t) for t in texts], add_special_tokens=False)
    return [e.ids for e in encs]


def decode(tok: Tokenizer, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Text of `ids`; special tokens are kept unless asked otherwise (so round trips are exact)."""
    return tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    """The `tokenizer_config.json` contents transformers reads next to `tokenizer.json`."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "mask_token": MASK,
        # Byte-level BPE has no unknown token: every byte is in the vocabulary.
        "unk_token": None,
        "additional_special_tokens": [SYSTEM, USER, ASSISTANT, END],
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
        "model_max_length": model_max_length,
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tok: Tokenizer, dir: Path | str, model_max_length: int) -> list[Path]:
    """Write `tokenizer.json` and `tokenizer_config.json` into `dir`; returns both paths."""
    check_special_tokens(tok, "save_tokenizer")
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    tok_path, cfg_path = dir / "tokenizer.json", dir / "tokenizer_config.json"
    # Serialize a fresh copy: runtime flags such as encode_special_tokens must not leak in.
    tok_path.write_text(Tokenizer.from_str(tok.to_str()).to_str(pretty=True) + "\n", "utf-8")
    cfg = tokenizer_config(model_max_length)
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [tok_path, cfg_path]


def tokenizer_file(path: Path | str) -> Path:
    """The `tokenizer.json` that `path` names: the file itself, or the one inside a directory.

    An artifact directory (tokens or checkpoint) must be complete, and its tokenizer.json must
    match the manifest's sha256.
    """
    from llmctl.artifacts import is_artifact, open_artifact, sha256_file

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such tokenizer file or directory")
    if path.is_file():
        return path
    file = path / "tokenizer.json"
    if is_artifact(path):
        m = open_artifact(path, ("tokens", "checkpoint"), verify=False)
        meta = m.files.get("tokenizer.json")
        if meta is None or not file.is_file():
            raise UsageError(f"{path}: {m.kind} artifact without a tokenizer.json")
        if sha256_file(file) != meta["sha256"]:
            raise UsageError(f"{file}: sha256 differs from the manifest (corrupted or edited)")
    elif not file.is_file():
        raise UsageError(f"{path}: no tokenizer.json in this directory")
    return file


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load an llmctl tokenizer from a tokenizer.json, a tokens artifact or a checkpoint dir."""
    file = tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise UsageError(f"{file}: not a valid tokenizer.json ({str(e)[:120]})") from e
    check_special_tokens(tok, str(file))
    return tok


@lru_cache(maxsize=1)
def _chat_template() -> Any:
    # The same environment settings transformers uses for chat templates.
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATE)


def render_chat(messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The chat as text in llmctl's template (encode it with special tokens recognized).

    >>> render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    '<|bos|><|user|>Hi<|end|><|assistant|>'
    """
    from jinja2.exceptions import TemplateError

    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UsageError(f"chat message {i}: expected {{'role': ..., 'content': str}}")
        if m.get("role") not in CHAT_ROLES:
            raise UsageError(f"chat message {i}: role must be one of {', '.join(CHAT_ROLES)}")
    try:
        return _chat_template().render(
            messages=[{**m, "content": clean_text(m["content"])} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=BOS,
            eos_token=EOS,
        )
    except TemplateError as e:
        raise UsageError(f"chat template: {e}") from e
