"""The cleaning steps: one test per drop reason (a document that trips exactly that rule and
one just under it), the line/PII rewrites, and the fast paths checked against a plain
transcription of datatrove's code."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmctl.data import filters as F
from llmctl.data.docs import Doc

DATA = Path(__file__).parent / "data" / "web"


def doc(text: str) -> Doc:
    return Doc("t", text, "test", {})


def only(cfg_cls: type, **keep: float) -> object:
    """A config with every numeric rule of the step off except the ones given."""
    off = {
        f.name: 0 if f.type in ("float", "int") else getattr(cfg_cls(), f.name)
        for f in dataclasses.fields(cfg_cls)
    }
    return cfg_cls(**{**off, **keep})


def filler(n: int, prefix: str = "w") -> list[str]:
    """n distinct alphabetic words: wab, wac, ... (no digits, so each is one token)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [
        prefix + letters[i // 26 % 26] + letters[i % 26] + letters[i // 676 % 26] for i in range(n)
    ]


# --- normalize -----------------------------------------------------------------------------


def test_normalize_repairs_text_and_drops_empty() -> None:
    step = F.Normalize(F.NormalizeConfig())
    d = doc("\ufeffCafe\u0301\x00 one\u00a0two\u200b \r\nnext\x07 line\t \rlast\u2028end  ")
    assert step(d) is None
    assert d.text == "Café one two\nnext line\nlast\nend"
    assert step.counts["docs_changed"] == 1
    assert step(doc(" \r\n\t\x00\u200b ")) == "empty_doc"
    assert step(doc("x")) is None  # just above: one character survives


def test_normalize_strips_gutenberg_boilerplate() -> None:
    raw = (DATA / "botchan_excerpt.txt").read_bytes().decode("utf-8").lstrip("\ufeff")
    step = F.Normalize(F.NormalizeConfig())
    d = doc(raw)
    assert step(d) is None
    assert d.text.startswith("Produced by David Starner")
    assert "project gutenberg" not in d.text.lower()
    assert d.text.endswith("[R: Rad]")  # transcriber notes, the last lines of the book
    assert "\r" not in d.text
    assert step.counts["gutenberg_stripped"] == 1
    off = F.Normalize(F.NormalizeConfig(gutenberg=False))
    d2 = doc(raw)
    off(d2)
    assert "*** START OF THIS PROJECT GUTENBERG EBOOK" in d2.text


# --- language ------------------------------------------------------------------------------

ENGLISH = "The committee met on Tuesday to discuss the budget for the coming year and agreed."
FRENCH = "Le comité s'est réuni mardi pour discuter du budget de l'année prochaine et a conclu."


def test_language_keeps_english_and_labels() -> None:
    step = F.Language(F.LanguageConfig())
    d = doc(ENGLISH)
    assert step(d) is None
    assert d.meta["language"] == "en" and d.meta["language_score"] > 0.65
    f = doc(FRENCH)
    assert step(f) == "language"
    assert f.meta["language"] == "fr"
    assert F.Language(F.LanguageConfig(keep=["fr", "en"]))(doc(FRENCH)) is None
    assert F.Language(F.LanguageConfig(keep=[]))(doc(FRENCH)) is None  # label only


def test_language_threshold_boundary() -> None:
    d = doc(ENGLISH)
    F.Language(F.LanguageConfig(keep=[]))(d)
    score = d.meta["language_score"]
    # The stored score is rounded to 4 places; thresholds just below and at it.
    assert F.Language(F.LanguageConfig(threshold=score - 0.001))(doc(ENGLISH)) is None
    assert F.Language(F.LanguageConfig(threshold=score + 0.001))(doc(ENGLISH)) == "language"


# --- Gopher repetition ---------------------------------------------------------------------

R = F.GopherRepetitionConfig


def test_dup_para_frac() -> None:
    step = F.GopherRepetition(only(R, dup_para_frac=0.3))
    uniq = [" ".join(filler(3, f"p{i}")) for i in range(7)]
    # 10 paragraphs, 3 of them repeats: 0.3 is not above 0.3; 4 of 10 is.
    assert step(doc("\n\n".join([*uniq, uniq[0], uniq[1], uniq[2]]))) is None
    assert (
        step(doc("\n\n".join([*uniq[:6], uniq[0], uniq[1], uniq[2], uniq[3]]))) == "dup_para_frac"
    )


@pytest.mark.parametrize("sep", ["\n\n", "\n"])
def test_dup_char_frac(sep: str) -> None:
    reason = "dup_para_char_frac" if sep == "\n\n" else "dup_line_char_frac"
    step = F.GopherRepetition(only(R, **{reason: 0.2}))
    a = "a" * 20
    # 20 repeated chars over a 100-char text is exactly 0.2 (kept); over 99 it is above.
    x = 100 - 40 - 2 * len(sep)
    assert step(doc(sep.join([a, "b" * x, a]))) is None
    assert step(doc(sep.join([a, "b" * (x - 1), a]))) == reason


def test_dup_line_frac() -> None:
    step = F.GopherRepetition(only(R, dup_line_frac=0.3))
    uniq = [" ".join(filler(3, f"l{i}")) for i in range(7)]
    assert step(doc("\n".join([*uniq, uniq[0], uniq[1], uniq[2]]))) is None
    assert step(doc("\n".join([*uniq[:6], uniq[0], uniq[1], uniq[2], uniq[3]]))) == "dup_line_frac"


@pytest.mark.parametrize(("n", "frac"), [(2, 0.20), (3, 0.18), (4, 0.16)])
def test_top_ngram(n: int, frac: float) -> None:
    step = F.GopherRepetition(only(R, **{f"top_{n}_gram": frac}))
    gram = " ".join(f"g{c}" for c in "abcd"[:n])  # "ga gb", "ga gb gc", ...
    k = 10
    head = " ".join([gram] * k)
    chars = len(gram) * k
    target = next(size for size in range(1, 10_000) if chars / size <= frac)  # shortest kept

    def text(length: int) -> str:
        body = head + " " + " ".join(filler(10, "z"))
        return body + " " + "q" * (length - len(body) - 1)

    assert len(text(target)) == target
    assert F.top_ngram_chars(F.words(text(target)), n) == len(gram) * k
    assert step(doc(text(target))) is None
    assert step(doc(text(target - 1))) == f"top_{n}_gram"


@pytest.mark.parametrize("n", [5, 6, 7, 8, 9, 10])
def test_duplicated_ngrams(n: int) -> None:
    frac = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}[n]
    step = F.GopherRepetition(only(R, **{f"dup_{n}_gram": frac}))
    phrase = filler(n, "r")  # n distinct 4-letter words, said twice: 4n repeated chars
    target = next(size for size in range(1, 10_000) if 4 * n / size <= frac)  # shortest kept

    def text(length: int) -> str:
        body = " ".join(phrase + phrase)
        return body + " " + "q" * (length - len(body) - 1)

    assert len(text(target)) == target
    assert step(doc(text(target))) is None
    assert step(doc(text(target - 1))) == f"duplicated_{n}_n_grams"


def test_repetition_order_first_failing_rule_wins() -> None:
    step = F.GopherRepetition(F.GopherRepetitionConfig())
    para = "same paragraph here"
    assert step(doc("\n\n".join([para] * 5))) == "dup_para_frac"
    assert (
        step(doc("\n".join(["one line", "other line", "one line", "one line"]))) == "dup_line_frac"
    )


# --- Gopher quality ------------------------------------------------------------------------

Q = F.GopherQualityConfig
BASE = ["the", "and"]


def q(text: str, **cfg: object) -> str | None:
    return F.GopherQuality(Q(**cfg))(doc(text))  # type: ignore[arg-type]


def test_gopher_short_and_long_doc() -> None:
    assert q(" ".join(BASE + filler(47))) == "gopher_short_doc"  # 49 non-symbol words
    assert q(" ".join(BASE + filler(48))) is None  # 50
    # Punctuation tokens are not words: 49 words and 10 commas are still short.
    assert q(" ".join(BASE + filler(47)) + " ," * 10) == "gopher_short_doc"
    assert q(" ".join(BASE + filler(59)), max_doc_words=60) == "gopher_long_doc"
    assert q(" ".join(BASE + filler(58)), max_doc_words=60) is None


def test_gopher_mean_word_length() -> None:
    # the, and (3 chars) + 24 x 2 chars + 24 x 4 chars: mean exactly 3.0
    words = BASE + ["ab"] * 24 + ["abcd"] * 24
    assert q(" ".join(words)) is None
    assert q(" ".join([*words[:-1], "abc"])) == "gopher_below_avg_threshold"
    # 6 + 46 x 10 + 2 x 17 = 500 chars over 50 words: mean exactly 10
    long = BASE + ["abcdefghij"] * 46 + ["abcdefghijklmnopq"] * 2
    assert q(" ".join(long)) is None
    assert q(" ".join([*long[:-1], "abcdefghijklmnopqr"])) == "gopher_above_avg_threshold"


@pytest.mark.parametrize(
    ("mark", "reason"),
    [
        ("#", "gopher_too_many_hashes"),
        ("...", "gopher_too_many_ellipsis"),
        ("…", "gopher_too_many_ellipsis"),
    ],
)
def test_gopher_symbol_ratio(mark: str, reason: str) -> None:
    words = BASE + filler(48)
    # k marks among 50 words: k / (50 + k) > 0.1 first at k = 6.
    assert q(" ".join(words[:25] + [mark] * 5 + words[25:])) is None
    assert q(" ".join(words[:25] + [mark] * 6 + words[25:])) == reason


def test_gopher_bullets_and_end_ellipsis() -> None:
    lines = [" ".join(BASE + filler(6, f"b{i}")) for i in range(10)]
    assert q("\n".join(["- " + s for s in lines[:9]] + lines[9:])) is None  # 0.9
    assert q("\n".join("- " + s for s in lines)) == "gopher_too_many_bullets"
    assert q("\n".join("• " + s for s in lines)) == "gopher_too_many_bullets"
    assert q("\n".join([s + "..." for s in lines[:3]] + lines[3:])) is None  # 0.3
    assert q("\n".join([s + " …" for s in lines[:4]] + lines[4:])) == "gopher_too_many_end_ellipsis"


def test_gopher_alpha_words() -> None:
    words = BASE + filler(48)
    assert q(" ".join(words + ["123"] * 12)) is None  # 50 / 62 = 0.806
    assert q(" ".join(words + ["123"] * 13)) == "gopher_below_alpha_threshold"  # 50 / 63


def test_gopher_stop_words() -> None:
    assert q(" ".join(["the"] * 2 + filler(48))) == "gopher_enough_stop_words"
    assert q(" ".join(["the", "with", *filler(48)])) is None
    assert q(" ".join(["The", "With", *filler(48)])) == "gopher_enough_stop_words"  # case counts


# --- C4 ------------------------------------------------------------------------------------


def sentences(k: int, tag: str = "s") -> list[str]:
    return [f"Line {tag}{i} has enough words here." for i in range(k)]


def test_c4_min_sentences_and_line_removal() -> None:
    step = F.C4(F.C4Config())
    assert step(doc("\n".join(sentences(4)))) == "too_few_sentences"
    d = doc(
        "\n".join(
            [
                "Menu",
                *sentences(3),
                "Enable JavaScript to view it.",
                *sentences(2, "t"),
                "Read our privacy policy now.",
                "x" * 1001 + " long word line.",
                "Cited claim here[1] and more[citation needed].",
            ]
        )
    )
    assert step(d) is None
    assert d.text.split("\n") == [*sentences(3), *sentences(2, "t"), "Cited claim here and more."]
    assert step.counts == Counter(
        line_too_few_words=1,
        line_javascript=1,
        line_policy=1,
        line_too_long_word=1,
        lines_removed=4,
    )
    # Two sentences on one line count twice.
    assert step(doc("\n".join([*sentences(3), "First one here. Second one here."]))) is None


def test_c4_lorem_ipsum_and_curly_bracket() -> None:
    step = F.C4(F.C4Config())
    base = sentences(5)
    assert step(doc("\n".join([*base, "Lorem ipsum dolor sit amet."]))) == "lorem_ipsum"
    assert step(doc("\n".join([*base, "function f() { return 1; }"]))) == "curly_bracket"
    # Just under: the same words on lines removed by an earlier check keep the document.
    assert step(doc("\n".join([*base, "lorem ipsum"]))) is None  # < 3 words
    assert step(doc("\n".join([*base, "javascript: var x = {a: 1};"]))) is None


def test_c4_terminal_punctuation_is_off_by_default() -> None:
    text = "\n".join([*sentences(5), "A line without an end mark"])
    d = doc(text)
    assert F.C4(F.C4Config())(d) is None and d.text.endswith("end mark")
    on = F.C4(F.C4Config(filter_no_terminal_punct=True))
    d = doc(text + "\nAnd an ellipsis line ends...")
    assert on(d) is None and d.text == "\n".join(sentences(5))
    assert on.counts["line_no_terminal_punct"] == 2


# --- FineWeb -------------------------------------------------------------------------------


def fw(text: str) -> str | None:
    return F.FineWeb(F.FineWebConfig())(doc(text))


def long_lines(k: int, end: str = ".") -> list[str]:
    return [" ".join(filler(6, f"f{i}")) + end for i in range(k)]


def test_fineweb_line_punct_ratio() -> None:
    lines = long_lines(100, end="")
    assert fw("\n".join([s + "." for s in lines[:12]] + lines[12:])) == "line_punct_ratio"  # 0.12
    assert fw("\n".join([s + "." for s in lines[:13]] + lines[13:])) is None


def test_fineweb_short_line_ratio() -> None:
    short = [f"Tiny line {i:02d} ok." for i in range(67)]  # 17 chars, 4 tokens
    assert fw("\n".join(short + long_lines(33))) == "short_line_ratio"  # 0.67
    assert fw("\n".join(short[:66] + long_lines(34))) is None


def test_fineweb_char_dup_ratio() -> None:
    # Non-newline chars: 9 unique lines + 1 repeated line of 10 chars; the repeat's 10 chars
    # over 1000 is exactly 0.01 (dropped: the rule is >=).
    dup = "Dup line.."  # 10 chars
    body = long_lines(9)
    pad = 1000 - sum(map(len, body)) - 2 * len(dup)
    body[0] = body[0][:-1] + "x" * pad + "."
    assert fw("\n".join([dup, *body, dup])) == "char_dup_ratio"
    body[0] = body[0][:-1] + "x."
    assert fw("\n".join([dup, *body, dup])) is None


def test_fineweb_list_ratio() -> None:
    lines = [f"abcdefghijklmnop{i:02d} qrstuvwxyzabcdefgh." for i in range(11)]  # 3 tokens
    assert fw("\n".join(lines)) == "list_ratio"  # 10 newlines / 33 words
    assert fw("\n".join(lines[:10])) is None  # 9 / 30 = 0.3


# --- PII -----------------------------------------------------------------------------------


def test_pii_replaces_emails_and_public_ips_only() -> None:
    step = F.PII(F.PIIConfig())
    d = doc("Mail Jane.Doe@Example.com or bob@mail.org; hosts 8.8.8.8, 192.168.1.10 and 1.1.1.1.")
    assert step(d) is None
    assert d.text == (
        "Mail email@example.com or firstname.lastname@example.org; hosts 22.214.171.124, "
        "192.168.1.10 and 126.96.36.199."
    )
    assert step.counts == Counter(emails=2, ips=2)
    again = doc("a@b.co")
    step(again)  # cycling restarts per document: identical output for any worker count
    assert again.text == "email@example.com"


# --- the chain -----------------------------------------------------------------------------


def chain_cfg(**over: object) -> object:
    from llmctl.commands.clean import CleanConfig

    return CleanConfig(**over)  # type: ignore[arg-type]


def test_chain_stops_at_first_drop_and_counts() -> None:
    chain = F.build_chain(chain_cfg())
    assert [s.name for s in chain.steps] == list(F.STEPS)
    assert chain(doc("   ")) == ("normalize", "empty_doc")
    assert chain(doc(FRENCH)) == ("language", "language")
    off = F.build_chain(chain_cfg(language=F.LanguageConfig(enabled=False)))
    assert "language" not in [s.name for s in off.steps]
    assert off(doc(FRENCH)) is not None and off(doc(FRENCH))[0] != "language"


def test_real_c4_docs_mostly_survive() -> None:
    chain = F.build_chain(chain_cfg())
    texts = [json.loads(line)["text"] for line in (DATA / "c4_demo.jsonl").open()]
    verdicts = [chain(doc(t)) for t in texts]
    assert sum(v is None for v in verdicts) >= 12


# --- fast paths == datatrove's plain computation -------------------------------------------


def reference_repetition(text: str, cfg: F.GopherRepetitionConfig) -> str | None:
    """datatrove's GopherRepetitionFilter.filter, transcribed (n-grams as word tuples)."""

    def find_duplicates(x: list[str]) -> tuple[int, int]:
        unique, chars, elements = set(), 0, 0
        for e in x:
            if e in unique:
                chars += len(e)
                elements += 1
            else:
                unique.add(e)
        return elements, chars

    paragraphs = re.split(r"\n{2,}", text.strip())
    d, c = find_duplicates(paragraphs)
    if cfg.dup_para_frac and d / len(paragraphs) > cfg.dup_para_frac:
        return "dup_para_frac"
    if cfg.dup_para_char_frac and c / len(text) > cfg.dup_para_char_frac:
        return "dup_para_char_frac"
    lines = re.split("\n+", text)
    d, c = find_duplicates(lines)
    if cfg.dup_line_frac and d / len(lines) > cfg.dup_line_frac:
        return "dup_line_frac"
    if cfg.dup_line_char_frac and c / len(text) > cfg.dup_line_char_frac:
        return "dup_line_char_frac"
    words = F.WORD_RE.findall(text)
    for n in (2, 3, 4):  # a threshold of 0 leaves n out, as omitting it from datatrove's tuple
        grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        frac = getattr(cfg, f"top_{n}_gram")
        if not grams or not frac:
            continue
        top, count = Counter(grams).most_common(1)[0]
        if len(top) * count / len(text) > frac:
            return f"top_{n}_gram"
    for n in range(5, 11):
        frac = getattr(cfg, f"dup_{n}_gram")
        if not frac:
            continue
        unique: set[str] = set()
        repeated, idx = 0, 0
        while idx < len(words) - n + 1:
            gram = " ".join(words[idx : idx + n])
            if gram in unique:
                repeated += len(gram) - (n - 1)
                idx += n
            else:
                unique.add(gram)
                idx += 1
        if repeated / len(text) > frac:
            return f"duplicated_{n}_n_grams"
    return None


def reference_quality(text: str, cfg: F.GopherQualityConfig) -> str | None:
    """datatrove's GopherQualityFilter.filter, transcribed."""
    words = F.WORD_RE.findall(text)
    n_words = len(words)
    non_symbol = [w for w in words if any(ch not in F.PUNCTUATION for ch in w)]
    if len(non_symbol) < cfg.min_doc_words or not non_symbol:
        return "gopher_short_doc"
    if len(non_symbol) > cfg.max_doc_words:
        return "gopher_long_doc"
    avg = sum(len(w) for w in non_symbol) / len(non_symbol)
    if avg < cfg.min_avg_word_length:
        return "gopher_below_avg_threshold"
    if avg > cfg.max_avg_word_length:
        return "gopher_above_avg_threshold"
    if text.count("#") / n_words > cfg.max_symbol_word_ratio:
        return "gopher_too_many_hashes"
    if (text.count("...") + text.count("…")) / n_words > cfg.max_symbol_word_ratio:
        return "gopher_too_many_ellipsis"
    lines = text.splitlines()
    if (
        sum(s.lstrip().startswith(("•", "-")) for s in lines) / len(lines)
        > cfg.max_bullet_lines_ratio
    ):
        return "gopher_too_many_bullets"
    if (
        sum(s.rstrip().endswith(("...", "…")) for s in lines) / len(lines)
        > cfg.max_ellipsis_lines_ratio
    ):
        return "gopher_too_many_end_ellipsis"
    if sum(any(c.isalpha() for c in w) for w in words) / n_words < cfg.max_non_alpha_words_ratio:
        return "gopher_below_alpha_threshold"
    if len(set(cfg.stop_words) & set(words)) < cfg.min_stop_words:
        return "gopher_enough_stop_words"
    return None


def real_texts() -> list[str]:
    texts = [json.loads(line)["text"] for line in (DATA / "c4_demo.jsonl").open()]
    texts += [json.loads(line)["text"] for line in (DATA / "cc_en_head-0091.jsonl").open()]
    return texts


def test_fast_paths_match_reference_on_real_docs() -> None:
    rep, qual = F.GopherRepetitionConfig(), F.GopherQualityConfig()
    # Tighter thresholds make the n-gram rules decide more often.
    strict = dataclasses.replace(rep, top_2_gram=0.02, top_3_gram=0.01, top_4_gram=0.005)
    dups = only(R, **{f"dup_{n}_gram": 0.001 * n for n in range(5, 11)})
    for text in real_texts():
        for cfg in (rep, strict, dups):
            assert F.GopherRepetition(cfg)(doc(text)) == reference_repetition(text, cfg)
        assert F.GopherQuality(qual)(doc(text)) == reference_quality(text, qual)


VOCAB = st.sampled_from(
    [
        "the",
        "and",
        "of",
        "cat",
        "sat",
        "mat",
        "#",
        "...",
        "…",
        "-",
        "•",
        "123",
        "x",
        "é",
        "\n",
        "\n\n",
        ".",
        ",",
        "word",
        "longerword",
    ]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(VOCAB, min_size=1, max_size=400), st.floats(0.001, 0.4))
def test_fast_paths_match_reference_on_generated_text(tokens: list[str], frac: float) -> None:
    text = " ".join(tokens).strip() or "x"
    rep = only(
        R,
        **{f"dup_{n}_gram": frac for n in range(5, 11)},
        top_2_gram=frac * 2,
        top_3_gram=frac * 1.5,
        top_4_gram=frac,
    )
    assert F.GopherRepetition(rep)(doc(text)) == reference_repetition(text, rep)
    full = F.GopherRepetitionConfig()
    assert F.GopherRepetition(full)(doc(text)) == reference_repetition(text, full)
    qual = F.GopherQualityConfig(min_doc_words=5)
    assert F.GopherQuality(qual)(doc(text)) == reference_quality(text, qual)


def test_sentence_counter() -> None:
    assert F.count_sentences("One here. Two here! Three? four. Mr. Smith came. e.g. This") == 4
    assert F.count_sentences("no end mark") == 1


# --- any text (reliability.md D8) ------------------------------------------------------------

# What parse_raw lets through: any str without lone surrogates (those are rejected there).
NASTY = [
    "\x00", "\x07", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\r", "\r\n", "\t", "\n\n",
    "\ufeff", "\u200b", "\u00a0", "e\u0301", "\U0001f600", "\uffff", "***",
    "*** START OF THE PROJECT GUTENBERG EBOOK X ***\n", "*** END OF THIS PROJECT GUTENBERG EBOOK",
    "lorem ipsum", "{", "•", "...", "a@b.example", "8.8.8.8", "javascript",
    "The cat sat on the mat. ",
]  # fmt: skip
ANY_TEXT = st.lists(
    st.one_of(
        st.text(st.characters(exclude_categories=["Cs"]), max_size=12), st.sampled_from(NASTY)
    ),
    max_size=40,
).map("".join)
# Characters normalize removes or rewrites (tab and newline stay).
CONTROL = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029]} - {"\t", "\n"}


@functools.cache
def full_chain() -> F.Chain:
    from llmctl.commands.clean import CleanConfig

    return F.build_chain(CleanConfig())


@settings(max_examples=100, deadline=None)
@given(ANY_TEXT)
def test_every_step_and_the_chain_take_any_text(text: str) -> None:
    chain = full_chain()
    for step in chain.steps:  # each step on the raw text, so every step sees every input
        reason = step(doc(text))
        assert reason is None or (isinstance(reason, str) and reason), step.name
    d = doc(text)
    verdict = chain(d)
    chain.take_counts()
    if verdict is not None:
        assert verdict[0] in F.STEPS and verdict[1]
        return
    assert d.text.strip() and not CONTROL & set(d.text)
    assert unicodedata.is_normalized("NFC", d.text)
