"""data/filters.py edges the main tests share a warm cache or a default for: Gopher's word
classes computed from an empty cache (and kept in it), C4's policy lines kept when the policy
filter is off."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llmctl.data import filters as F
from llmctl.data.docs import Doc


@pytest.fixture
def empty_cache() -> Iterator[None]:
    saved = dict(F._WORD_CLASS)
    F._WORD_CLASS.clear()
    yield
    F._WORD_CLASS.clear()
    F._WORD_CLASS.update(saved)


@pytest.mark.usefixtures("empty_cache")
def test_word_classes_from_an_empty_cache() -> None:
    # bit 1: has a non-symbol character; bit 2: has a letter
    want = {"word": 3, "123": 1, "a1": 3, "...": 0, "—": 0, "Ⅻ": 3, "é": 3, "#": 0}
    assert {w: F.word_class(w) for w in want} == want
    assert want == F._WORD_CLASS  # cached for the next document
    assert {w: F.word_class(w) for w in want} == want


@pytest.mark.usefixtures("empty_cache")
def test_gopher_counts_digit_words_as_not_alphabetic() -> None:
    words = ["the", "and", *[f"w{chr(97 + i % 26)}{chr(97 + i // 26)}" for i in range(48)]]
    step = F.GopherQuality(F.GopherQualityConfig())
    assert step(Doc("t", " ".join(words + ["123"] * 12), "test", {})) is None
    F._WORD_CLASS.clear()
    assert step(Doc("t", " ".join(words + ["123"] * 13), "test", {})) == (
        "gopher_below_alpha_threshold"
    )


def test_c4_keeps_policy_lines_when_the_policy_filter_is_off() -> None:
    lines = [f"Line s{i} has enough words here." for i in range(5)]
    text = "\n".join([*lines, "Read our privacy policy now."])
    off = Doc("t", text, "test", {})
    assert F.C4(F.C4Config(filter_policy=False))(off) is None and off.text == text
    on = Doc("t", text, "test", {})
    assert F.C4(F.C4Config())(on) is None and on.text == "\n".join(lines)


def test_a_repeat_in_the_last_ngram_counts() -> None:
    # the only repeated 2-gram ("ab cd") ends the text: datatrove counts its 4 chars
    assert F.repeated_ngram_chars(["ab", "cd", "x", "ab", "cd"], 2)[0] == 4
    assert F.repeated_ngram_chars(["ab", "cd", "x", "ab", "ce"], 2)[0] == 0
