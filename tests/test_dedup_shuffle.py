"""data/dedup.py's map / shuffle / reduce form of LSH (band_entries, bucket_pairs,
verify_packed: what a cluster engine runs) gives exactly lsh_edges' pairs, in this process,
for any split into blocks and partitions; plus the S-curve and the LSH report's figures."""

from __future__ import annotations

import numpy as np
import pytest

from llmctl.data.dedup import (
    Signer,
    band_entries,
    bucket_pairs,
    fmix64,
    jaccard_estimate,
    lsh_edges,
    lsh_report,
    s_curve,
    unpack_pairs,
    verify_packed,
)


def signatures() -> np.ndarray:
    """60 documents x 24 hash positions: clusters of near copies (a few positions changed)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**32, (12, 24), dtype=np.uint64).astype(np.uint32)
    sig = np.repeat(base, 5, axis=0)
    flip = rng.random(sig.shape) < 0.25
    sig[flip] = rng.integers(0, 2**32, int(flip.sum()), dtype=np.uint64).astype(np.uint32)
    return sig[rng.permutation(len(sig))]


@pytest.mark.parametrize(("blocks", "parts"), [(1, 1), (3, 4), (7, 2)])
def test_shuffled_lsh_equals_lsh_edges(blocks: int, parts: int) -> None:
    sig, bands, rows = signatures(), 6, 4
    i, j = lsh_edges(sig, bands, rows)
    assert len(i) > 20  # the clusters do collide
    want = set(zip(i.tolist(), j.tolist(), strict=True))
    nodes = np.arange(len(sig))
    parts_of = [band_entries(sig, b, bands, rows, parts) for b in np.array_split(nodes, blocks)]
    for block in parts_of:
        assert len(block) == parts
        for p, entries in enumerate(block):  # each entry lies in the partition of its key
            assert (entries["key"] % np.uint64(parts) == p).all()
    assert sum(len(e) for block in parts_of for e in block) == len(sig) * bands
    got = set()
    for p in range(parts):
        packed = bucket_pairs(np.concatenate([block[p] for block in parts_of]))
        a, b = unpack_pairs(packed)
        assert (a < b).all() and len(np.unique(packed)) == len(packed)
        got |= set(zip(a.tolist(), b.tolist(), strict=True))
    assert got == want


def test_bucket_pairs_of_distinct_keys_is_empty() -> None:
    e = np.zeros(3, band_entries(np.zeros((1, 4), np.uint32), np.arange(1), 1, 4, 1)[0].dtype)
    e["key"] = [1, 2, 3]
    e["node"] = [0, 1, 2]
    assert bucket_pairs(e).dtype == np.uint64 and len(bucket_pairs(e)) == 0


def test_verify_packed_splits_by_signature_jaccard() -> None:
    sig = signatures()
    i, j = lsh_edges(sig, 6, 4)
    packed = (i.astype(np.uint64) << np.uint64(32)) | j.astype(np.uint64)
    ok, rejected = verify_packed(sig, packed, 0.6, verify=True)
    est = jaccard_estimate(sig, i, j)
    assert len(ok) == int((est >= 0.6).sum()) and len(ok) + len(rejected) == len(packed)
    assert 0 < len(rejected) < len(packed)
    a, b = unpack_pairs(ok)
    assert (jaccard_estimate(sig, a, b) >= 0.6).all()
    same, none = verify_packed(sig, packed, 0.6, verify=False)
    assert same is packed and len(none) == 0
    empty = packed[:0]
    assert verify_packed(sig, empty, 0.6, verify=True)[0] is empty


def test_s_curve_is_the_band_collision_probability() -> None:
    assert s_curve(0.5, 4, 2) == pytest.approx(1 - (1 - 0.25) ** 4)
    np.testing.assert_allclose(s_curve(np.array([0.0, 1.0]), 4, 2), [0.0, 1.0])


def test_signed_arrays_have_their_documented_dtypes() -> None:
    signer = Signer()
    assert len(signer.a) == 112  # datatrove's default: 14 bands x 8 rows
    for texts in (["one two three four five six", "one two three four five seven"], []):
        s = signer.sign(texts)
        assert s.exact.dtype == np.uint64 and s.sig.dtype == np.uint32
        assert s.shingles.dtype == np.int32 and s.contam.dtype == np.int32
        assert s.contam_frac.dtype == np.float32
        assert s.sig.shape == (len(texts), 112) and (s.contam == -1).all()
    assert Signer().sign(["one two three four five six"]).shingles.tolist() == [2]


def test_lsh_report_rounds_to_four_places() -> None:
    r = lsh_report(112, 14, 8, 0.8)
    assert r == {
        "num_perm": 112, "bands": 14, "rows": 8, "threshold": 0.8,
        "p_candidate": {f"{s}": round(float(s_curve(s, 14, 8)), 4) for s in (0.5, 0.7, 0.8, 0.9)},
    }  # fmt: skip
    assert 0 < r["p_candidate"]["0.5"] < 0.1 and 0.9 < r["p_candidate"]["0.9"] < 1


def test_fmix64_is_murmurhash3s_finalizer() -> None:
    """Band keys and shingle hashes go through MurmurHash3's fmix64 (the reference, in Python
    integers, here): the hashes, and so the signatures, are the same on every engine."""
    mask = (1 << 64) - 1

    def reference(k: int) -> int:
        k ^= k >> 33
        k = (k * 0xFF51AFD7ED558CCD) & mask
        k ^= k >> 33
        k = (k * 0xC4CEB9FE1A85EC53) & mask
        return k ^ (k >> 33)

    x = np.random.default_rng(0).integers(0, 2**64, 1000, dtype=np.uint64)
    assert fmix64(x).tolist() == [reference(int(v)) for v in x]
