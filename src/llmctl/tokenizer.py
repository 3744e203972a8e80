"""The tokenizer: byte-level BPE trained with Hugging Face `tokenizers`, saved in HF form.

What it is:
- Pre-tokenization splits text with a GPT-4 style regex (words with their leading space or
  punctuation, runs of whitespace the modern way) in which digits form groups of at most two, as
  nanochat chose ("2 is the sweet spot" at a 32K vocabulary; ours defaults to 8K, so spending
  few tokens on digit groups matters more). Pieces are then mapped to bytes (ByteLevel with
  `use_regex=False`), and the initial alphabet is all 256 bytes: there is no unknown token.
- Special tokens of a tokenizer llmctl trains have fixed ids 0..7 (`SPECIAL_TOKENS`), whatever
  the vocabulary size. Code that runs on a checkpoint never assumes them: it reads the ids from
  the tokenizer files with `load_specials` (an imported model has its own BOS/EOS/pad).
- Plain prompts follow one convention, written into `tokenizer.json`'s post-processor so that
  transformers builds the same ids: `encode_prompt` = the tokenizer's own special tokens around
  the text (for llmctl tokenizers a leading <|eos|>, the document separator of the shards, so a
  prompt starts a fresh document as in pretraining; for imported ones e.g. BOS).
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
    specials = load_specials(Path("out/tok"))        # .eos .end_of_turn .pad .all ...
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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
    tok.post_processor = prompt_processor()
    return tok


def prompt_processor() -> processors.TemplateProcessing:
    """What `add_special_tokens=True` adds for llmctl tokenizers: a leading <|eos|> (the
    document separator), so `encode_prompt` here and transformers' tokenizer agree."""
    return processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B:1", special_tokens=[(EOS, EOS_ID)]
    )


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


def encode_prompt(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of a plain prompt: the text with the tokenizer's own special tokens added
    (its post-processor), exactly as transformers' `tokenizer(text)` builds them."""
    return tok.encode(clean_text(text), add_special_tokens=True).ids


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


def with_hf_post_processor(tok_path: Path, tc_path: Path) -> bytes | None:
    """tokenizer.json with the post-processor transformers builds when the file has none and
    tokenizer_config.json says add_bos_token / add_eos_token (so `encode_prompt` adds the same
    specials as transformers' tokenizer); None when nothing needs adding."""
    try:
        tok = json.loads(tok_path.read_text(encoding="utf-8"))
        tc = json.loads(tc_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{tok_path.parent}: tokenizer files are not valid JSON ({e})") from None
    if not isinstance(tok, dict) or not isinstance(tc, dict) or tok.get("post_processor"):
        return None
    ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    ids |= {k: v for k, v in tok.get("model", {}).get("vocab", {}).items() if k not in ids}

    def name(key: str) -> str | None:
        v = tc.get(key)
        v = v.get("content") if isinstance(v, dict) else v
        return v if isinstance(v, str) and v in ids else None

    bos = name("bos_token") if tc.get("add_bos_token") else None
    eos = name("eos_token") if tc.get("add_eos_token") else None
    if bos is None and eos is None:
        return None
    # the template transformers' update_post_processor writes
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    specials = [(t, ids[t]) for t in (bos, eos) if t]
    proc = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
    tok["post_processor"] = json.loads(proc.__getstate__())
    return (json.dumps(tok, indent=2, ensure_ascii=False) + "\n").encode()


def minimal_tokenizer_config(dir: Path, raw: dict[str, Any]) -> bytes:
    """A tokenizer_config.json for a transformers folder that has none: the fast tokenizer
    class and the bos/eos/pad tokens its config.json (`raw`) names by id."""
    tok = json.loads((dir / "tokenizer.json").read_text(encoding="utf-8"))
    names = {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
    vocab = {v: k for k, v in tok.get("model", {}).get("vocab", {}).items()}
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for key in ("bos", "eos", "pad"):
        i = raw.get(f"{key}_token_id")
        i = i[0] if isinstance(i, list) and i else i
        if isinstance(i, int) and (i in names or i in vocab):
            out[f"{key}_token"] = names.get(i, vocab.get(i))
    return (json.dumps(out, indent=2) + "\n").encode()


def tokenizer_config_with_template(checkpoint: Path, template: str | None) -> bytes | None:
    """`checkpoint`'s tokenizer_config.json with `template` written in as its chat_template
    (None: as it is), so a trained model carries the template it was trained with (`generate
    --chat` and transformers render what was trained); None when it has no such file."""
    path = checkpoint / "tokenizer_config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if template is not None:
        data["chat_template"] = template
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def tokenizer_file(path: Path | str) -> Path:
    """The `tokenizer.json` that `path` names: the file itself, or the one inside a directory.

    An artifact directory (tokens or checkpoint) must be complete, and its tokenizer.json must
    match the manifest's sha256.
    """
    from llmctl.artifacts import is_artifact, open_artifact, sha256_file

    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such tokenizer file or directory")
    if not path.is_dir():
        from llmctl.files import check_regular

        check_regular(path, "tokenizer file")  # a FIFO or device is refused, never read
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


def tokenizer_sha256(path: Path | str) -> str:
    """sha256 of the tokenizer.json that `path` names (`tokenizer_file`): two models, or a
    model and its token data, share one vocabulary exactly when these are equal."""
    from llmctl.artifacts import sha256_file

    return sha256_file(tokenizer_file(path))


def load_tokenizer(path: Path | str) -> Tokenizer:
    """Load a tokenizer from a tokenizer.json, a tokens artifact or a checkpoint dir (llmctl's
    own or an imported model's: its special ids are whatever `load_specials` reads)."""
    file = tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise UsageError(f"{file}: not a valid tokenizer.json ({str(e)[:120]})") from e


# End-of-turn tokens of common chat formats, tried in this order when the config names none.
END_OF_TURN_TOKENS = (END, "<|im_end|>", "<|eot_id|>", "<end_of_turn>")


@dataclass(frozen=True)
class Specials:
    """The special token ids of one tokenizer, read from its files.

    `eos` ends a document (and a completion); `end_of_turn` ends an assistant turn (llmctl's
    <|end|>, or `eos` for a model without chat tokens); `pad` may be None where masks make
    its value irrelevant; `all` is every special id (excluded from bits per byte, never a
    masked-LM target)."""

    eos: int
    end_of_turn: int
    bos: int | None = None
    pad: int | None = None
    mask: int | None = None
    all: frozenset[int] = frozenset()

    @property
    def stop(self) -> frozenset[int]:
        """Ids that end generation: eos and end of turn."""
        return frozenset({self.eos, self.end_of_turn})

    @property
    def pad_or_eos(self) -> int:
        """A filler id for padded rows (its value never matters where masks hide it)."""
        return self.pad if self.pad is not None else self.eos


def _token_name(value: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as {"content": ...}
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_specials(path: Path | str) -> Specials:
    """The special ids of the tokenizer that `path` names (a tokenizer.json, or a directory or
    artifact holding one), from `tokenizer_config.json` beside it (bos/eos/pad/mask tokens) and
    the special added tokens of `tokenizer.json`. UsageError naming the file when a named
    token is not in the vocabulary or there is no end-of-sequence token."""
    file = tokenizer_file(path)
    tok = load_tokenizer(file)
    cfg_path = file.parent / "tokenizer_config.json"
    cfg: dict[str, Any] = {}
    if cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise UsageError(f"{cfg_path}: expected a JSON object")
    elif tok.token_to_id(EOS) == EOS_ID:  # a bare llmctl tokenizer.json
        cfg = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "mask_token": MASK}
    where = cfg_path if cfg_path.is_file() else file

    def id_of(key: str) -> int | None:
        name = _token_name(cfg.get(key))
        if name is None:
            return None
        found = tok.token_to_id(name)
        if found is None:
            raise UsageError(f"{where}: {key} {name!r} is not in the vocabulary")
        return found

    eos = id_of("eos_token")
    if eos is None:
        raise UsageError(f"{where}: no eos_token: cannot tell where a document or answer ends")
    turn = _token_name(cfg.get("end_of_turn_token"))
    turn_id = tok.token_to_id(turn) if turn else None
    for name in END_OF_TURN_TOKENS:
        if turn_id is None:
            turn_id = tok.token_to_id(name)
    added = json.loads(tok.to_str()).get("added_tokens", [])
    ids = {t["id"] for t in added if t.get("special")}
    named = [id_of(k) for k in ("bos_token", "pad_token", "mask_token", "unk_token")]
    ids |= {i for i in (eos, turn_id, *named) if i is not None}
    return Specials(
        eos=eos,
        end_of_turn=turn_id if turn_id is not None else eos,
        bos=named[0],
        pad=named[1],
        mask=named[2],
        all=frozenset(ids),
    )


@lru_cache(maxsize=8)
def _chat_template(source: str = CHAT_TEMPLATE) -> Any:
    # The same environment settings transformers uses for chat templates.
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise UsageError(f"chat template: not valid Jinja ({e})") from e


def chat_template_of(path: Path | str) -> str | None:
    """The `chat_template` of the `tokenizer_config.json` in `path` (a checkpoint or tokens
    directory), or None when there is none. A malformed file is a UsageError naming it."""
    file = Path(path) / "tokenizer_config.json"
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{file}: not valid JSON ({e})") from None
    template = data.get("chat_template") if isinstance(data, dict) else None
    if template is not None and not isinstance(template, str):
        raise UsageError(f"{file}: chat_template must be a string (named templates unsupported)")
    return template or None


def render_chat(
    messages: Sequence[dict[str, str]],
    add_generation_prompt: bool = False,
    template: str | None = None,
) -> str:
    """The chat as text in `template` (default: llmctl's `CHAT_TEMPLATE`); encode it with
    special tokens recognized.

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
        return _chat_template(template or CHAT_TEMPLATE).render(
            messages=[{**m, "content": clean_text(m["content"])} for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=BOS,
            eos_token=EOS,
        )
    except TemplateError as e:
        raise UsageError(f"chat template: {e}") from e
    except Exception as e:  # a foreign template can fail in any jinja way (undefined names)
        raise UsageError(f"chat template: {type(e).__name__}: {e}") from e
