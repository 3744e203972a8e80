"""The tokenizer layer: training, special-token ids, round trips, HF compatibility, chat."""

from __future__ import annotations

import json
import random
from functools import cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models

from llmctl.data.corpus import TrainingSample
from llmctl.errors import UsageError
from llmctl.tokenizer import (
    CHAT_TEMPLATE,
    EOS_ID,
    MIN_VOCAB,
    SPECIAL_TOKENS,
    decode,
    encode,
    encode_batch,
    encode_prompt,
    load_specials,
    load_tokenizer,
    plain_text_tokenizer,
    render_chat,
    save_tokenizer,
    train_tokenizer,
)

DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
TEXT = DATA.read_text(encoding="utf-8")
PARAGRAPHS = [p for p in TEXT.split("\n\n") if p.strip()]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a play.\nJust one."},
        {"role": "assistant", "content": "Hamlet."},
        {"role": "user", "content": "Another? 😀 café"},
    ],
]


@cache
def trained() -> Tokenizer:
    return train_tokenizer(PARAGRAPHS, vocab_size=512)


def test_special_tokens_have_fixed_ids_and_bytes_follow() -> None:
    for vocab in (MIN_VOCAB + 1, 512):
        tok = train_tokenizer(PARAGRAPHS, vocab_size=vocab)
        assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(8))
        assert tok.get_vocab_size() == vocab
    # The 256 byte tokens come next, so no text is ever unknown.
    tok = trained()
    assert sorted(tok.get_vocab()[t] for t in tok.get_vocab() if tok.get_vocab()[t] < 264) == list(
        range(264)
    )


def test_vocab_too_small_is_refused() -> None:
    with pytest.raises(UsageError, match="at least 265"):
        train_tokenizer(PARAGRAPHS, vocab_size=264)


def test_training_is_deterministic() -> None:
    a = train_tokenizer(PARAGRAPHS, vocab_size=512).to_str()
    b = train_tokenizer(list(PARAGRAPHS), vocab_size=512).to_str()
    assert a == b


def test_digits_split_into_groups_of_at_most_two_and_words_keep_their_space() -> None:
    pieces = [p for p, _ in trained().pre_tokenizer.pre_tokenize_str("in 12345 ways")]
    # ByteLevel shows a space as "Ġ".
    assert pieces == ["in", "Ġ", "12", "34", "5", "Ġways"]


def test_encode_compresses_the_training_text() -> None:
    ids = encode(trained(), TEXT)
    assert len(TEXT) / len(ids) > 2.0  # 248 merges already join common words
    assert encode_batch(trained(), PARAGRAPHS[:3]) == [encode(trained(), p) for p in PARAGRAPHS[:3]]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_valid_text(text: str) -> None:
    tok = trained()
    assert decode(tok, encode(tok, text)) == text
    plain = plain_tokenizer()
    assert decode(plain, encode(plain, text)) == text


@cache
def plain_tokenizer() -> Tokenizer:
    return plain_text_tokenizer(trained())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=5), st.characters(categories=["Cs"])), max_size=8))
def test_lone_surrogates_become_replacement_characters(parts: list[str]) -> None:
    text = "".join(parts)
    want = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    assert decode(trained(), encode(trained(), text)) == want


def test_special_token_text_in_documents_stays_text() -> None:
    text = "end of story <|eos|> <|user|> not a turn"
    assert EOS_ID in encode(trained(), text)  # the default tokenizer splits special tokens out
    plain = plain_tokenizer()
    ids = encode(plain, text)
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert decode(plain, ids) == text


def test_save_and_load_keep_ids(tmp_path: Path) -> None:
    files = save_tokenizer(trained(), tmp_path, model_max_length=256)
    assert [f.name for f in files] == ["tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|eos|>" and cfg["model_max_length"] == 256
    assert cfg["chat_template"] == CHAT_TEMPLATE
    assert [cfg["added_tokens_decoder"][str(i)]["content"] for i in range(8)] == list(
        SPECIAL_TOKENS
    )
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        assert encode(load_tokenizer(path), TEXT[:2000]) == encode(trained(), TEXT[:2000])
    # The plain-text flag is a runtime setting: it must not be saved.
    save_tokenizer(plain_tokenizer(), tmp_path / "p", 256)
    assert (tmp_path / "p" / "tokenizer.json").read_bytes() == files[0].read_bytes()


def test_load_refuses_foreign_and_broken_files(tmp_path: Path) -> None:
    foreign = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    foreign.save(str(tmp_path / "foreign.json"))
    # Any tokenizer loads (imported models have their own); its special ids must be knowable.
    assert load_tokenizer(tmp_path / "foreign.json").get_vocab_size() == 2
    with pytest.raises(UsageError, match=r"foreign.json: no eos_token"):
        load_specials(tmp_path / "foreign.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UsageError, match=r"broken.json: not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(UsageError, match=r"no tokenizer.json in this directory"):
        load_tokenizer(tmp_path)
    with pytest.raises(UsageError, match="no such tokenizer"):
        load_tokenizer(tmp_path / "missing")


def test_render_chat() -> None:
    assert render_chat(CHATS[0], add_generation_prompt=True) == (
        "<|bos|><|user|>Hi<|end|><|assistant|>"
    )
    assert render_chat(CHATS[1][:3]) == (
        "<|bos|><|system|>You are terse.<|end|><|user|>Name a play.\nJust one.<|end|>"
        "<|assistant|>Hamlet.<|end|>"
    )
    with pytest.raises(UsageError, match="chat message 0: role must be"):
        render_chat([{"role": "tool", "content": "x"}])
    with pytest.raises(UsageError, match="chat message 1"):
        render_chat([{"role": "user", "content": "x"}, {"role": "user"}])


def test_training_sample_is_order_independent_and_bounded() -> None:
    docs = PARAGRAPHS[:200]
    budget = sum(len(d.encode()) for d in docs) // 3

    def sample_of(order: list[str]) -> list[str]:
        s = TrainingSample(budget, doc_chars=100)
        for d in order:
            s.offer(d)
        return s.texts()

    a = sample_of(docs)
    shuffled = list(docs)
    random.Random(0).shuffle(shuffled)
    assert sample_of(shuffled) == a
    assert sum(len(t.encode()) for t in a) == budget  # filled exactly, the last text trimmed
    assert all(len(t) <= 100 for t in a)
    assert 0 < len(a) < len(docs)


@pytest.mark.slow  # importing transformers takes seconds
def test_transformers_loads_the_same_ids_and_chat(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    save_tokenizer(trained(), tmp_path, model_max_length=4096)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.mask_token_id) == (0, 1, 2, 3)
    assert hf.model_max_length == 4096
    for text in [TEXT[:3000], "naïve café 😀 — 12345\n\n\tend", PARAGRAPHS[5]]:
        # The prompt convention lives in tokenizer.json: a leading <|eos|> (id 1), as in generate.
        ids = hf(text, add_special_tokens=True)["input_ids"]
        assert ids == encode_prompt(trained(), text) == [1, *encode(trained(), text)]
        assert hf.decode(ids, skip_special_tokens=True) == text
    for chat in CHATS:
        for gen in (False, True):
            rendered = render_chat(chat, add_generation_prompt=gen)
            assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == (
                rendered
            )
            hf_ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=gen)
            hf_ids = hf_ids["input_ids"] if hasattr(hf_ids, "keys") else list(hf_ids)
            assert hf_ids == encode(trained(), rendered)
            assert hf_ids[0] == 0 and hf_ids.count(7) == len(chat)


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused() -> None:
    from llmctl.errors import UsageError
    from llmctl.tokenizer import check_fits

    tok = trained()
    check_fits(tok, 512, "ckpt")  # equal, and a padded model vocabulary, are fine
    check_fits(tok, 640, "ckpt")
    with pytest.raises(UsageError, match="ckpt: tokenizer has 512 tokens but the model embeds"):
        check_fits(tok, 511, "ckpt")
