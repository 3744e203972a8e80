"""Exact and near-duplicate detection: one text simplification, vectorized MinHash, LSH banding.

Everything here works on whole batches with numpy, never one Python call per shingle:

- `simplify` is the single normalization behind exact and near matching: lowercase,
  punctuation and symbols replaced by spaces, digit runs replaced by `0`, whitespace
  collapsed (datatrove's `simplify_text`, minus diacritic removal).
- `shingle_hashes` hashes every word n-gram of a batch at once: the simplified texts are
  joined into one byte array and every n-gram is a byte span, hashed by a polynomial rolling
  hash from prefix sums (mod 2^64) and finished with the MurmurHash3 64-bit mixer.
- `minhash` applies datasketch's "affine32" scheme (datasketch ≥ 2.0's default) to the
  shingle hashes: MurmurHash3 32-bit finalizer, then `a·h + b mod 2^32` per permutation with
  `(a, b)` drawn exactly as `datasketch.MinHash(num_perm, seed)` draws them. Signatures are
  bit-for-bit those of `MinHash(num_perm, seed, hashfunc=int).update_batch(hashes)` (a test
  checks this), computed as one (shingles × perms) uint32 product per block.
- `lsh_edges` buckets band hashes with a numpy sort per band (no dict of Python objects),
  `jaccard_estimate` verifies candidate pairs on full signatures, and `components` is a
  vectorized union–find whose root is the smallest input index of each cluster.
- `plan_dedup` turns per-document arrays into keep/drop decisions with the kept twin.

The 32-bit hash MinHash consumes is the top half of the 64-bit n-gram hash; decontamination
uses all 64 bits of the 13-gram hashes.

Example:
    texts = ["A text, here.", "a TEXT here", "Something else entirely."]
    signed = Signer(num_perm=112, seed=1, ngram=5).sign(texts)
    b, r, t = lsh_params(num_perm=112)            # 14 bands × 8 rows, threshold ≈ 0.72
    plan = plan_dedup(signed, np.array([len(x) for x in texts]), bands=b, rows=r, threshold=t)
    plan.status                                   # [KEPT, EXACT, KEPT]
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
import xxhash

MAX32 = np.uint32(0xFFFFFFFF)
KEPT, EXACT, NEAR, CONTAMINATED = 0, 1, 2, 3
REASONS = {EXACT: "exact_duplicate", NEAR: "near_duplicate", CONTAMINATED: "contaminated"}
DEFAULT_BANDS, DEFAULT_ROWS = 14, 8  # datatrove's MinhashConfig: 112 perms, threshold ≈ 0.72

# ---------------------------------------------------------------------------------------------
# Simplification


@functools.cache
def _punct_re() -> re.Pattern[str]:
    """Anything that is not a word character, whitespace or a combining mark, plus `_`.

    Python's `\\w` excludes combining marks (Unicode category M), so `[^\\w\\s]` alone would
    cut Devanagari or Thai words apart at every vowel sign; the marks are allowed explicitly.
    """
    marks = [c for c in range(0x110000) if unicodedata.category(chr(c))[0] == "M"]
    ranges: list[tuple[int, int]] = []
    for c in marks:
        if ranges and c == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], c)
        else:
            ranges.append((c, c))
    cls = "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)
    return re.compile(rf"[^\w\s{cls}]|_")


_DIGITS = re.compile(r"\d+")


def simplify(text: str) -> str:
    """The normalization exact and near matching share.

    >>> simplify("Hello,  World! It's 2024.")
    'hello world it s 0'
    """
    text = _punct_re().sub(" ", text.lower())
    return " ".join(_DIGITS.sub("0", text).split())


# ---------------------------------------------------------------------------------------------
# N-gram hashes

_P = np.uint64(0x9E3779B97F4A7C15)  # odd, so it has an inverse mod 2^64
_P_INV = np.uint64(pow(int(_P), -1, 1 << 64))
_pow_cache: dict[str, np.ndarray] = {"p": np.ones(1, np.uint64), "inv": np.ones(1, np.uint64)}


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """p^i and p^-i mod 2^64 for i < n (cached, grown by doubling)."""
    if len(_pow_cache["p"]) < n:
        size = 1 << max(n - 1, 1).bit_length()
        for key, base in (("p", _P), ("inv", _P_INV)):
            arr = np.full(size, base, dtype=np.uint64)
            arr[0] = 1
            _pow_cache[key] = np.cumprod(arr, dtype=np.uint64)  # wraps mod 2^64 by design
    return _pow_cache["p"][:n], _pow_cache["inv"][:n]


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (a bijection that spreads every input bit)."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer, as datasketch's affine32 scheme applies it."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


@dataclass
class Words:
    """Word spans of a batch of simplified texts joined by newlines into one byte array."""

    prefix: np.ndarray  # prefix[i] = sum_{j<i} byte_j · p^-j  (mod 2^64)
    starts: np.ndarray  # byte offset of each word
    ends: np.ndarray  # byte offset just past each word
    first: np.ndarray  # index of each doc's first word
    count: np.ndarray  # words per doc

    @classmethod
    def of(cls, simple: Sequence[str]) -> Words:
        buf = np.frombuffer("\n".join(simple).encode("utf-8"), dtype=np.uint8)
        sep = (buf == 32) | (buf == 10)
        before, after = np.ones_like(sep), np.ones_like(sep)
        before[1:], after[:-1] = sep[:-1], sep[1:]
        starts = np.flatnonzero(~sep & before)
        ends = np.flatnonzero(~sep & after) + 1
        docs = np.searchsorted(np.flatnonzero(buf == 10), starts)  # newlines before the word
        count = np.bincount(docs, minlength=len(simple))
        first = np.cumsum(count) - count
        _, inv = _powers(len(buf))
        prefix = np.zeros(len(buf) + 1, dtype=np.uint64)
        np.cumsum(buf.astype(np.uint64) * inv, out=prefix[1:])
        return cls(prefix, starts, ends, first, count)

    def ngrams(self, n: int, whole_if_short: bool) -> tuple[np.ndarray, np.ndarray]:
        """64-bit hashes of every word n-gram, and the doc index of each (docs in order).

        A doc with fewer than `n` words gives one hash of all its words when
        `whole_if_short`, none otherwise. Empty docs give none.
        """
        m = np.maximum(self.count - n + 1, 0)
        if whole_if_short:
            m = np.where((self.count > 0) & (self.count < n), 1, m)
        doc = np.repeat(np.arange(len(m)), m)
        offset = np.arange(len(doc)) - np.repeat(np.cumsum(m) - m, m)
        lo = self.first[doc] + offset
        hi = np.minimum(lo + n - 1, self.first[doc] + self.count[doc] - 1)
        s, e = self.starts[lo], self.ends[hi]
        pw, _ = _powers(int(e.max()) if len(e) else 1)
        h = (self.prefix[e] - self.prefix[s]) * pw[e - 1]  # sum byte_j · p^(e-1-j)
        return fmix64(h + (e - s).astype(np.uint64) * _P), doc


def shingle_hashes(
    simple: Sequence[str], n: int, whole_if_short: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """(hash64, doc index) of every word n-gram of already simplified texts.

    Example: `h, doc = shingle_hashes(["a b c d e f"], 5)` gives 2 hashes, both of doc 0.
    """
    return Words.of(simple).ngrams(n, whole_if_short)


# ---------------------------------------------------------------------------------------------
# MinHash


def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) uint32 parameters `datasketch.MinHash(num_perm, seed)` draws (affine32)."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def minhash(
    h32: np.ndarray, doc: np.ndarray, n_docs: int, a: np.ndarray, b: np.ndarray, block: int = 4096
) -> np.ndarray:
    """(n_docs, num_perm) uint32 signatures of 32-bit shingle hashes grouped by sorted `doc`.

    A doc without shingles keeps the empty signature (all 0xFFFFFFFF), as datasketch does.
    """
    sig = np.full((n_docs, len(a)), MAX32, dtype=np.uint32)
    hv = fmix32(h32.astype(np.uint32, copy=False))
    for s in range(0, len(hv), block):
        d = doc[s : s + block]
        phv = np.multiply.outer(hv[s : s + block], a)  # uint32 wraps: that is the mod 2^32
        phv += b
        cut = np.flatnonzero(np.r_[True, d[1:] != d[:-1]])
        rows = d[cut]  # docs are contiguous, so each row appears once per block
        sig[rows] = np.minimum(sig[rows], np.minimum.reduceat(phv, cut, axis=0))
    return sig


@dataclass
class Signed:
    """What pass 1 keeps per document: compact arrays only, never the text."""

    exact: np.ndarray  # (n, 2) uint64: xxh3-128 of the simplified text
    sig: np.ndarray  # (n, num_perm) uint32 MinHash signature
    shingles: np.ndarray  # (n,) int32 number of shingles (0: nothing to compare)
    contam: np.ndarray  # (n,) int32 index of the first matching eval doc, or -1
    contam_frac: np.ndarray  # (n,) float32 share of the doc's n-grams found in eval docs

    @classmethod
    def concat(cls, parts: Sequence[Signed]) -> Signed:
        names = [f.name for f in fields(cls)]
        return cls(*(np.concatenate([getattr(p, k) for p in parts]) for k in names))


class EvalIndex:
    """Sorted 64-bit hashes of every word n-gram of the evaluation documents."""

    def __init__(self, docs: Sequence[tuple[str, str]], n: int = 13) -> None:
        self.n = n
        self.ids = [doc_id for doc_id, _ in docs]
        simple = [simplify(text) for _, text in docs]
        self.short = sum(1 for s in simple if len(s.split()) < n)
        h, doc = shingle_hashes(simple, n, whole_if_short=False)
        h, first = np.unique(h, return_index=True)  # sorted; the first eval doc per n-gram
        self.hashes, self.doc = h, doc[first].astype(np.int32)

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, h: np.ndarray) -> np.ndarray:
        """Eval doc index per hash, -1 where the n-gram is in no eval doc."""
        if not len(self.hashes):
            return np.full(len(h), -1, dtype=np.int32)
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        return np.where(self.hashes[pos] == h, self.doc[pos], -1).astype(np.int32)


class Signer:
    """Exact keys, MinHash signatures and eval overlap for batches of raw texts.

    Texts are processed in chunks of about `chunk_bytes`, which bounds the worker's memory.
    """

    def __init__(
        self,
        num_perm: int = 112,
        seed: int = 1,
        ngram: int = 5,
        eval_index: EvalIndex | None = None,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        self.a, self.b = permutations(num_perm, seed)
        self.ngram, self.eval, self.chunk_bytes = ngram, eval_index, chunk_bytes

    def sign(self, texts: Sequence[str]) -> Signed:
        simple = [simplify(t) for t in texts]
        parts, start, size = [], 0, 0
        for i, s in enumerate(simple):
            size += len(s)
            if size >= self.chunk_bytes or i == len(simple) - 1:
                parts.append(self._sign(texts[start : i + 1], simple[start : i + 1]))
                start, size = i + 1, 0
        return Signed.concat(parts) if parts else self._sign([], [])

    def _sign(self, texts: Sequence[str], simple: Sequence[str]) -> Signed:
        n = len(texts)
        exact = np.empty((n, 2), dtype=np.uint64)
        for i, (t, s) in enumerate(zip(texts, simple, strict=True)):
            # A text with no words left (only punctuation) is keyed on its raw form instead,
            # so that "!!!" and "???" are not called duplicates of each other.
            d = xxhash.xxh3_128_intdigest(s.encode() if s else b"\0raw" + t.encode())
            exact[i] = (d >> 64, d & 0xFFFFFFFFFFFFFFFF)
        contam = np.full(n, -1, dtype=np.int32)
        frac = np.zeros(n, dtype=np.float32)
        if not n:
            sig = np.empty((0, len(self.a)), np.uint32)
            return Signed(exact, sig, np.empty(0, np.int32), contam, frac)
        words = Words.of(simple)
        h, doc = words.ngrams(self.ngram, whole_if_short=True)
        sig = minhash((h >> np.uint64(32)).astype(np.uint32), doc, n, self.a, self.b)
        shingles = np.bincount(doc, minlength=n).astype(np.int32)
        if self.eval is not None and len(self.eval):
            h, doc = words.ngrams(self.eval.n, whole_if_short=False)
            match = self.eval.lookup(h)
            hit = match >= 0
            docs, first = np.unique(doc[hit], return_index=True)
            contam[docs] = match[hit][first]
            total = np.bincount(doc, minlength=n)
            frac = (np.bincount(doc[hit], minlength=n) / np.maximum(total, 1)).astype(np.float32)
        return Signed(exact, sig, shingles, contam, frac)


# ---------------------------------------------------------------------------------------------
# LSH parameters and the S-curve


def s_curve(s: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """Probability that a pair of Jaccard similarity `s` shares at least one band bucket."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


def _fp_fn(threshold: float, bands: int, rows: int) -> tuple[float, float]:
    from scipy.integrate import quad

    fp, _ = quad(lambda s: 1 - (1 - s ** float(rows)) ** float(bands), 0.0, threshold)
    fn, _ = quad(lambda s: (1 - s ** float(rows)) ** float(bands), threshold, 1.0)
    return fp, fn


def optimal_bands(
    threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) minimizing the weighted false-positive + false-negative area.

    The same search and integrals as `datasketch.lsh._optimal_param`, e.g.
    `optimal_bands(0.8, 128) == (9, 13)`.
    """
    best, opt = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp, fn = _fp_fn(threshold, b, r)
            err = fp * fp_weight + fn * fn_weight
            if err < best:
                best, opt = err, (b, r)
    return opt


def lsh_params(
    num_perm: int, bands: int | None = None, rows: int | None = None, threshold: float | None = None
) -> tuple[int, int, float]:
    """Resolve (bands, rows, verification threshold).

    Both bands and rows given: used as they are. Only a threshold: bands × rows are chosen
    from the S-curve for `num_perm`. Nothing: 14 × 8. The threshold defaults to the S-curve's
    midpoint (1/bands)^(1/rows). Raises ValueError for an impossible combination.
    """
    if (bands is None) != (rows is None):
        raise ValueError("set both near.bands and near.rows, or neither")
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise ValueError(f"near.threshold must be in (0, 1), got {threshold}")
    if bands is None or rows is None:
        if threshold is None:
            bands, rows = DEFAULT_BANDS, DEFAULT_ROWS
        else:
            bands, rows = optimal_bands(threshold, num_perm)
    if bands < 1 or rows < 1 or bands * rows > num_perm:
        raise ValueError(f"near.bands × near.rows = {bands} × {rows} needs ≤ num_perm ({num_perm})")
    if threshold is None:
        threshold = (1.0 / bands) ** (1.0 / rows)
    return bands, rows, float(threshold)


# ---------------------------------------------------------------------------------------------
# Candidates, verification, clusters


def _band_key(cols: np.ndarray, band: int) -> np.ndarray:
    h = np.full(len(cols), (band * 0x9E3779B97F4A7C15 + 1) % (1 << 64), dtype=np.uint64)
    for c in range(cols.shape[1]):
        h = fmix64(h ^ cols[:, c].astype(np.uint64))
    return h


def lsh_edges(
    sig: np.ndarray, bands: int, rows: int, nodes: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (i < j, as positions in `nodes`) sharing a bucket in at least one band.

    `nodes` selects the rows of `sig` that take part (default: all); only one band of them
    is copied at a time, never the whole signature matrix.

    Each band's keys are sorted; inside a bucket every member is paired with the bucket's
    first member and with its predecessor (2·(size-1) pairs, not size²), enough for
    union–find to join a true cluster even when verification rejects some pairs.
    """
    pairs = []
    rows_of = slice(None) if nodes is None else nodes
    for band in range(bands):
        key = _band_key(sig[rows_of, band * rows : (band + 1) * rows], band)
        order = np.argsort(key, kind="stable")
        k = key[order]
        same = np.r_[False, k[1:] == k[:-1]]
        if not same.any():
            continue
        pos = np.arange(len(k))
        head = np.maximum.accumulate(np.where(same, 0, pos))
        idx = np.flatnonzero(same)
        for left in (order[head[idx]], order[idx - 1]):
            lo, hi = np.minimum(left, order[idx]), np.maximum(left, order[idx])
            pairs.append((lo.astype(np.uint64) << np.uint64(32)) | hi.astype(np.uint64))
        if len(pairs) > 64:  # bound memory on very duplicated corpora
            pairs = [np.unique(np.concatenate(pairs))]
    if not pairs:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    packed = np.unique(np.concatenate(pairs))
    return (packed >> np.uint64(32)).astype(np.int64), (packed & MAX32).astype(np.int64)


# The same candidate pairs as `lsh_edges`, found as a map / shuffle / reduce that a cluster can
# spread out: `band_entries` (map, per block of documents) emits (band, key, node) triples split
# into partitions by key; `bucket_pairs` (reduce, per partition) pairs the members of each
# bucket by the rule `lsh_edges` uses (each with the bucket's first member and with its
# predecessor, in index order). A bucket lies whole in one partition, so the union of the
# partitions' pairs is exactly `lsh_edges`' set, for any number of blocks and partitions.
BAND_ENTRY = np.dtype([("band", "<u4"), ("key", "<u8"), ("node", "<i8")])


def band_entries(
    sig: np.ndarray, nodes: np.ndarray, bands: int, rows: int, parts: int
) -> list[np.ndarray]:
    """(band, key, node) for each band of the documents `nodes`, in `parts` lists by key."""
    out = np.empty(len(nodes) * bands, BAND_ENTRY)
    for band in range(bands):
        s = slice(band * len(nodes), (band + 1) * len(nodes))
        out["band"][s] = band
        out["key"][s] = _band_key(sig[nodes, band * rows : (band + 1) * rows], band)
        out["node"][s] = nodes
    part = (out["key"] % np.uint64(parts)).astype(np.int64)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(parts + 1))
    return [out[order[bounds[p] : bounds[p + 1]]] for p in range(parts)]


def bucket_pairs(entries: np.ndarray) -> np.ndarray:
    """Candidate pairs of one partition's entries, packed as (i << 32) | j with i < j, unique."""
    e = entries[np.lexsort((entries["node"], entries["key"], entries["band"]))]
    band, key, node = e["band"], e["key"], e["node"]
    same = np.r_[False, (band[1:] == band[:-1]) & (key[1:] == key[:-1])]
    if not same.any():
        return np.empty(0, np.uint64)
    pos = np.arange(len(e))
    head = np.maximum.accumulate(np.where(same, 0, pos))
    idx = np.flatnonzero(same)
    right = node[idx].astype(np.uint64)
    lefts = (node[head[idx]], node[idx - 1])
    pairs = [(left.astype(np.uint64) << np.uint64(32)) | right for left in lefts]
    return np.unique(np.concatenate(pairs))


def verify_packed(
    sig: np.ndarray, packed: np.ndarray, threshold: float, verify: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Split packed candidate pairs into (verified, rejected) by signature Jaccard ≥ threshold."""
    if not verify or not len(packed):
        return packed, packed[:0]
    i, j = unpack_pairs(packed)
    ok = jaccard_estimate(sig, i, j) >= threshold
    return packed[ok], packed[~ok]


def unpack_pairs(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return (packed >> np.uint64(32)).astype(np.int64), (packed & MAX32).astype(np.int64)


def jaccard_estimate(
    sig: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 1 << 15
) -> np.ndarray:
    """Share of equal signature positions for each pair (i[k], j[k]), as float32."""
    out = np.empty(len(i), dtype=np.float32)
    for s in range(0, len(i), chunk):
        eq = sig[i[s : s + chunk]] == sig[j[s : s + chunk]]
        out[s : s + chunk] = eq.mean(axis=1)
    return out


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Union–find over edges (i, j): each node's root is the smallest index of its cluster.

    Vectorized: hook every edge's larger root under its smaller one, then compress paths by
    pointer jumping; repeat until every edge is inside one cluster. Parents only decrease,
    so the result does not depend on edge order.
    """
    parent = np.arange(n)
    while len(i):
        ri, rj = parent[i], parent[j]
        open_ = ri != rj
        i, j, ri, rj = i[open_], j[open_], ri[open_], rj[open_]
        if not len(i):
            break
        np.minimum.at(parent, np.maximum(ri, rj), np.minimum(ri, rj))
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


# (sig, nodes, bands, rows, threshold, verify) -> (i, j, candidate count): the verified pairs
# as global indices, sorted by (i, j), and how many distinct candidate pairs LSH proposed.
NearPairs = Callable[
    [np.ndarray, np.ndarray, int, int, float, bool], tuple[np.ndarray, np.ndarray, int]
]


def near_pairs(
    sig: np.ndarray, nodes: np.ndarray, bands: int, rows: int, threshold: float, verify: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """LSH candidates among `nodes` and their verification, in this process (see NearPairs)."""
    i, j = lsh_edges(sig, bands, rows, nodes)
    i, j = nodes[i], nodes[j]
    candidates = len(i)
    if verify and len(i):
        ok = jaccard_estimate(sig, i, j) >= threshold
        i, j = i[ok], j[ok]
    return i, j, candidates


@dataclass
class Plan:
    """Per-document decisions, in input order."""

    status: np.ndarray  # uint8: KEPT, EXACT, NEAR or CONTAMINATED
    rep: np.ndarray  # int64: index of the kept doc this one duplicates (itself when kept)
    similarity: np.ndarray  # float32: estimated Jaccard with `rep` (contaminated: n-gram share)
    cluster: np.ndarray  # int64: cluster id = smallest input index in the cluster
    size: np.ndarray  # int64: cluster size (all members, exact duplicates included)
    contam: np.ndarray  # int32: eval doc index for contaminated docs, else -1
    stats: dict[str, int] = field(default_factory=dict)

    def fields(self, k: int, doc_id: Callable[[int], str], eval_ids: Sequence[str]) -> dict:
        """The fields dedup adds to document `k`'s record (removal fields when it is dropped)."""
        out: dict = {"cluster_id": int(self.cluster[k]), "cluster_size": int(self.size[k])}
        status = self.status[k]
        if status != KEPT:
            twin = eval_ids[self.contam[k]] if status == CONTAMINATED else doc_id(self.rep[k])
            sim = round(float(self.similarity[k]), 4)
            out.update(reason=REASONS[status], duplicate_of=twin, similarity=sim)
        return out

    def largest(self, doc_id: Callable[[int], str], top: int = 5) -> list[dict]:
        """The biggest clusters (> 1 doc) as {kept id, size}, biggest first."""
        sizes = np.where(self.status == KEPT, self.size, 0)
        order = np.argsort(-sizes, kind="stable")[:top]
        return [{"kept": doc_id(int(i)), "size": int(sizes[i])} for i in order if sizes[i] > 1]


def plan_dedup(
    signed: Signed,
    lengths: np.ndarray,
    *,
    use_exact: bool = True,
    use_near: bool = True,
    bands: int = DEFAULT_BANDS,
    rows: int = DEFAULT_ROWS,
    threshold: float = 0.72,
    verify: bool = True,
    keep: Literal["first", "longest"] = "first",
    pairs: NearPairs | None = None,
) -> Plan:
    """Decide which documents stay, from pass-1 arrays and each doc's length (for `longest`).

    Order: contaminated docs leave first (they take part in nothing else); exact duplicates
    of an earlier doc leave next; the remaining docs with shingles are clustered by MinHash
    LSH (+ verification) and one per cluster stays: the first in input order, or the longest
    (ties: the first). `pairs` finds the verified near pairs (default: `near_pairs`, here;
    an engine may pass its distributed equivalent, which must return the same pairs).
    """
    sig, shingles = signed.sig, signed.shingles
    n = len(signed.exact)
    contaminated = signed.contam >= 0
    status = np.where(contaminated, CONTAMINATED, KEPT).astype(np.uint8)
    alive = ~contaminated
    rep = np.arange(n)
    # Exact: group identical keys among live docs; the first occurrence represents the group.
    if use_exact and n:
        live = np.flatnonzero(alive)
        keys = np.ascontiguousarray(signed.exact[live]).view([("hi", "<u8"), ("lo", "<u8")])
        _, first, inverse = np.unique(keys.ravel(), return_index=True, return_inverse=True)
        rep[live] = live[first[inverse.ravel()]]
        dup = rep != np.arange(n)
        status[dup] = EXACT
        alive &= ~dup
    stats = {"candidate_pairs": 0, "verified_pairs": 0, "rejected_pairs": 0}
    # Near: LSH over the live docs that have shingles.
    root = np.arange(n)
    if use_near:
        nodes = np.flatnonzero(alive & (shingles > 0))
        find = pairs or near_pairs
        i, j, candidates = find(sig, nodes, bands, rows, threshold, verify)
        stats["candidate_pairs"] = candidates
        stats["rejected_pairs"] = candidates - len(i)
        stats["verified_pairs"] = len(i)
        root = components(n, i, j)
        keeper = root.copy()
        if keep == "longest" and len(nodes):
            # Per root: the longest member, ties to the smallest index.
            order = np.lexsort((nodes, -lengths[nodes], root[nodes]))
            r = root[nodes][order]
            firsts = np.r_[True, r[1:] != r[:-1]]
            keeper[r[firsts]] = nodes[order][firsts]
            keeper = keeper[root]
        status[alive & (keeper != np.arange(n))] = NEAR
        rep[alive] = keeper[alive]
    # Exact duplicates follow their twin into its near cluster.
    exact_dup = status == EXACT
    first = rep[exact_dup]
    rep[exact_dup] = rep[first]
    cluster = root.copy()
    cluster[exact_dup] = root[first]
    members = np.bincount(cluster[~contaminated], minlength=n)
    similarity = np.ones(n, dtype=np.float32)
    similarity[contaminated] = signed.contam_frac[contaminated]
    has = ((status == EXACT) | (status == NEAR)) & (shingles > 0) & (shingles[rep] > 0)
    similarity[has] = jaccard_estimate(sig, np.flatnonzero(has), rep[has])
    stats["clusters"] = int((members > 1).sum())
    stats["largest_cluster"] = int(members.max()) if n else 0
    return Plan(status, rep, similarity, cluster, members[cluster], signed.contam, stats)


class Collected:
    """Pass-1 results for a whole corpus, compact: ids in one byte blob, sizes, signatures."""

    def __init__(self, num_perm: int) -> None:
        self.num_perm = num_perm
        self._ids: list[bytes] = []
        self._id_lens: list[np.ndarray] = []
        self._sizes: list[np.ndarray] = []
        self._parts: list[Signed] = []

    def add(self, ids: Sequence[str], sizes: np.ndarray, signed: Signed) -> None:
        """One batch: doc ids, (chars, utf-8 bytes) per doc, and its Signed arrays."""
        encoded = [i.encode("utf-8", "surrogatepass") for i in ids]
        self._ids.append(b"".join(encoded))
        self._id_lens.append(np.array([len(e) for e in encoded], dtype=np.int64))
        self._sizes.append(sizes)
        self._parts.append(signed)

    def finish(self) -> tuple[Signed, np.ndarray]:
        """(all Signed arrays, (n, 2) sizes); ids stay available through `doc_id`."""
        self.blob = b"".join(self._ids)
        lens = np.concatenate([np.zeros(0, np.int64), *self._id_lens])
        self.offsets = np.concatenate([[0], np.cumsum(lens)])
        signed = Signed.concat(self._parts) if self._parts else Signer(self.num_perm).sign([])
        sizes = np.concatenate(self._sizes) if self._sizes else np.zeros((0, 2), np.int64)
        self._ids, self._id_lens, self._sizes, self._parts = [], [], [], []
        return signed, sizes

    def doc_id(self, k: int) -> str:
        return self.blob[self.offsets[k] : self.offsets[k + 1]].decode("utf-8", "surrogatepass")


def lsh_report(num_perm: int, bands: int, rows: int, threshold: float) -> dict:
    """The band setting in words and numbers: P(candidate) at similarities 0.5 … 0.9."""
    curve = {f"{s}": round(float(s_curve(s, bands, rows)), 4) for s in (0.5, 0.7, 0.8, 0.9)}
    return {
        "num_perm": num_perm,
        "bands": bands,
        "rows": rows,
        "threshold": round(threshold, 4),
        "p_candidate": curve,
    }
