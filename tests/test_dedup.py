"""`llmctl dedup`: exact and near duplicates, determinism, decontamination, LSH maths.

Corpora are built at test time from 40 real C4 documents (tests/data/dedup/c4_sample.jsonl):
exact copies, close variants with known edits, eval files with known overlaps.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llmctl.artifacts import open_artifact
from llmctl.cli import app
from llmctl.data import dedup as dd
from llmctl.data.docs import read_docs_artifact

DATA = Path(__file__).parent / "data" / "dedup" / "c4_sample.jsonl"
TEXTS = [json.loads(line)["text"] for line in DATA.read_text(encoding="utf-8").splitlines()]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def substitute(text: str, rate: float, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split(" ")
    for i in rng.sample(range(len(words)), max(1, int(rate * len(words)))):
        words[i] = "zzz" + str(rng.randrange(10**6))
    return " ".join(words)


def dedup(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["dedup", *map(str, args)])
    return result.exit_code, result.output


def rejected(out: Path) -> list[dict]:
    with gzip.open(out / "rejected" / "dropped-00000.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 originals, then: an exact copy of doc 0 (case and punctuation changed, so equal only
    after simplification), a 1%-substituted copy of doc 1 with a footer, doc 2 truncated to 90%,
    a second exact copy of doc 0, and doc 7's paragraphs reordered."""
    recs = [{"id": f"o{i}", "text": t} for i, t in enumerate(TEXTS)]
    paras = TEXTS[7].split("\n")
    recs += [
        {"id": "exact0", "text": TEXTS[0].upper().replace(".", " !")},
        {
            "id": "near1",
            "text": substitute(TEXTS[1], 0.01, 1) + "\nShare this page on social media.",
        },
        {"id": "trunc2", "text": TEXTS[2][: int(len(TEXTS[2]) * 0.9)]},
        {"id": "exact0b", "text": TEXTS[0]},
        {"id": "reorder7", "text": "\n".join(paras[len(paras) // 2 :] + paras[: len(paras) // 2])},
    ]
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "docs.jsonl", recs)


@pytest.fixture(scope="module")
def deduped(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dedup") / "out"
    code, output = dedup(corpus, "--out", out, "--workers", "1")
    assert code == 0, output
    return out


def test_exact_near_and_distinct(deduped: Path) -> None:
    kept = list(read_docs_artifact(deduped))
    assert [r["id"] for r in kept] == [f"o{i}" for i in range(40)]
    sizes = {r["id"]: r["cluster_size"] for r in kept if r["cluster_size"] > 1}
    assert sizes == {"o0": 3, "o1": 2, "o2": 2, "o7": 2}
    assert kept[0]["cluster_id"] == 0 and kept[5]["cluster_id"] == 5
    drop = {r["id"]: r for r in rejected(deduped)}
    assert {k: (v["reason"], v["duplicate_of"]) for k, v in drop.items()} == {
        "exact0": ("exact_duplicate", "o0"),
        "near1": ("near_duplicate", "o1"),
        "trunc2": ("near_duplicate", "o2"),
        "exact0b": ("exact_duplicate", "o0"),
        "reorder7": ("near_duplicate", "o7"),
    }
    assert drop["exact0"]["similarity"] == 1.0
    assert 0.72 <= drop["near1"]["similarity"] < 1.0
    assert drop["trunc2"]["cluster_id"] == 2
    stats = open_artifact(deduped, "docs").stats
    assert (stats["docs_in"], stats["docs_out"]) == (45, 40)
    assert (stats["exact_removed"], stats["near_removed"], stats["contaminated"]) == (2, 3, 0)
    assert (stats["clusters"], stats["largest_cluster"]) == (4, 3)
    assert stats["largest_clusters"][0] == {"kept": "o0", "size": 3}


def test_dedup_of_a_docs_artifact_is_idempotent(deduped: Path, tmp_path: Path) -> None:
    code, output = dedup(deduped, "--out", tmp_path / "again", "-j", "1")
    assert code == 0, output
    again = list(read_docs_artifact(tmp_path / "again"))
    assert [r["id"] for r in again] == [r["id"] for r in read_docs_artifact(deduped)]
    assert all(r["cluster_size"] == 1 for r in again)
    assert open_artifact(tmp_path / "again", "docs").stats["docs_out"] == 40


def test_s_curve_numbers_match_closed_form(deduped: Path) -> None:
    lsh = open_artifact(deduped, "docs").stats["lsh"]
    assert (lsh["bands"], lsh["rows"], lsh["num_perm"]) == (14, 8, 112)
    for s, p in lsh["p_candidate"].items():
        assert p == round(1 - (1 - float(s) ** 8) ** 14, 4)
    assert lsh["p_candidate"]["0.8"] == 0.9235  # datatrove's comment: P(0.8) = 0.924
    assert lsh["threshold"] == round((1 / 14) ** (1 / 8), 4) == 0.719


def test_output_identical_across_workers_and_reruns(corpus: Path, tmp_path: Path) -> None:
    outs = []
    for i, workers in enumerate(["1", "2", "2"]):
        out = tmp_path / f"out{i}"
        code, output = dedup(corpus, "--out", out, "--workers", workers, "--quiet")
        assert code == 0, output
        outs.append(open_artifact(out, "docs"))
    assert outs[0].files == outs[1].files == outs[2].files
    assert outs[0].digest == outs[1].digest == outs[2].digest


def test_keep_longest(corpus: Path, tmp_path: Path) -> None:
    code, output = dedup(corpus, "--out", tmp_path / "o", "--set", "near.keep=longest", "-j", "1")
    assert code == 0, output
    kept_ids = [r["id"] for r in read_docs_artifact(tmp_path / "o")]
    # near1 (original + footer) is longer than o1; trunc2 is shorter than o2.
    assert "near1" in kept_ids and "o1" not in kept_ids and "o2" in kept_ids
    drop = {r["id"]: r for r in rejected(tmp_path / "o")}
    assert drop["o1"]["duplicate_of"] == "near1" and drop["o1"]["reason"] == "near_duplicate"
    assert drop["o1"]["cluster_id"] == 1  # the cluster keeps its id: smallest input index


def test_decontamination_drops_exactly_the_overlapping_docs(corpus: Path, tmp_path: Path) -> None:
    words5, words6 = TEXTS[5].split(), TEXTS[6].split()
    eval_file = write_jsonl(
        tmp_path / "eval.jsonl",
        [
            # 13 words of doc 5 (with different case and punctuation): a hit.
            {"id": "q1", "question": "Q: " + " ".join(words5[20:33]).upper() + "?!"},
            # only 12 consecutive words of doc 6: no 13-gram in common.
            {"id": "q2", "question": " ".join(words6[10:22]) + " and something else entirely new"},
        ],
    )
    out = tmp_path / "o"
    code, output = dedup(
        corpus, "--out", out, "--decontaminate", eval_file,
        "--set", "decontam.text_field=question", "-j", "1",
    )  # fmt: skip
    assert code == 0, output
    drop = {r["id"]: r for r in rejected(out) if r["reason"] == "contaminated"}
    assert list(drop) == ["o5"]
    assert drop["o5"]["duplicate_of"] == "q1"
    assert 0 < drop["o5"]["similarity"] < 0.1  # one 13-gram out of the doc's ~150
    stats = open_artifact(out, "docs").stats
    assert stats["contaminated"] == 1 and stats["docs_out"] == 39
    assert stats["decontam"]["eval_docs"] == 2


def test_malformed_records_are_kept_aside_and_strict_fails(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"text": TEXTS[0]}) + "\n{not json\n" + json.dumps({"body": "x"}) + "\n",
        encoding="utf-8",
    )
    code, output = dedup(src, "--out", tmp_path / "o", "-j", "1")
    assert code == 0, output
    errors = (tmp_path / "o" / "rejected" / "errors.jsonl").read_text().splitlines()
    assert [(json.loads(e)["line"], json.loads(e)["reason"]) for e in errors] == [
        (2, "bad_json"),
        (3, "missing_text"),
    ]
    stats = open_artifact(tmp_path / "o", "docs").stats
    assert stats["bad_records"] == {"bad_json": 1, "missing_text": 1} and stats["docs_out"] == 1
    code, output = dedup(src, "--out", tmp_path / "s", "--strict")
    assert code == 2 and "in.jsonl:2: bad_json" in output
    assert not (tmp_path / "s").exists()


def test_large_cluster_warns(tmp_path: Path) -> None:
    recs = [{"id": f"o{i}", "text": t} for i, t in enumerate(TEXTS[:20])]
    recs += [{"id": f"v{k}", "text": substitute(TEXTS[0], 0.01, k)} for k in range(5)]
    code, output = dedup(
        write_jsonl(tmp_path / "d.jsonl", recs), "--out", tmp_path / "o", "-j", "1"
    )
    assert code == 0
    assert "warning" in output and "one cluster holds 6 of 25 docs" in output


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["near.bands=10"], "set both near.bands and near.rows"),
        (["near.bands=20", "near.rows=8"], "needs ≤ num_perm (112)"),
        (["near.threshold=1.5"], "near.threshold must be in (0, 1)"),
        (["near.keep=shortest"], "'shortest' is not one of"),
    ],
)
def test_bad_settings_exit_2(corpus: Path, tmp_path: Path, sets: list[str], message: str) -> None:
    args = [x for s in sets for x in ("--set", s)]
    code, output = dedup(corpus, "--out", tmp_path / "o", *args)
    assert code == 2 and message in " ".join(output.split())


# --- library level ---------------------------------------------------------------------------


def test_simplify() -> None:
    assert dd.simplify("Hello,  World!\nIt's 2024 (v3.11)") == "hello world it s 0 v0 0"
    assert dd.simplify("हिन्दी — ‘quoted’ snake_case") == "हिन्दी quoted snake case"
    assert dd.simplify("?!") == ""


def test_shingle_hashes_depend_only_on_the_words() -> None:
    h, doc = dd.shingle_hashes(["a b c d e f", "x a b c d e", "a b", ""], 5)
    assert doc.tolist() == [0, 0, 1, 1, 2]
    assert h[0] == h[3]  # "a b c d e" in two docs, at two offsets
    assert len(set(h.tolist())) == 4
    h2, doc2 = dd.shingle_hashes(["a b c d e f", "a b"], 5, whole_if_short=False)
    assert doc2.tolist() == [0, 0] and h2.tolist() == h[:2].tolist()


@pytest.mark.parametrize(("num_perm", "seed"), [(112, 1), (128, 7), (16, 0)])
def test_signatures_equal_datasketch(num_perm: int, seed: int) -> None:
    from datasketch import MinHash

    simple = [dd.simplify(t) for t in TEXTS[:8]] + ["one two", ""]
    h, doc = dd.shingle_hashes(simple, 5)
    h32 = (h >> np.uint64(32)).astype(np.uint32)
    a, b = dd.permutations(num_perm, seed)
    sig = dd.minhash(h32, doc, len(simple), a, b, block=64)  # blocks split docs
    for d in range(len(simple)):
        m = MinHash(num_perm=num_perm, seed=seed, hashfunc=int)
        m.update_batch([int(x) for x in h32[doc == d]])
        assert np.array_equal(m.hashvalues, sig[d]), d


@pytest.mark.parametrize(("t", "num_perm"), [(0.8, 128), (0.5, 128), (0.7, 240), (0.72, 112)])
def test_band_choice_matches_datasketch(t: float, num_perm: int) -> None:
    from datasketch.lsh import _optimal_param

    assert dd.optimal_bands(t, num_perm) == _optimal_param(t, num_perm, 0.5, 0.5)
    if (t, num_perm) == (0.8, 128):
        assert dd.lsh_params(128, threshold=0.8) == (9, 13, 0.8)


def test_union_find_roots_are_smallest_index() -> None:
    rng = np.random.default_rng(0)
    n = 300
    i, j = rng.integers(0, n, 250), rng.integers(0, n, 250)
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    assert dd.components(n, i, j).tolist() == [find(x) for x in range(n)]


def test_verification_rejects_pairs_that_share_one_band_only() -> None:
    sig = np.arange(3 * 112, dtype=np.uint32).reshape(3, 112)
    sig[1, :8] = sig[0, :8]  # docs 0 and 1 share band 0: a candidate, Jaccard estimate 8/112
    sig[2] = sig[0]
    sig[2, -5:] += 1000  # doc 2 equals doc 0 but for 5 positions: estimate 107/112
    exact = np.arange(6, dtype=np.uint64).reshape(3, 2)
    none = np.full(3, -1, np.int32)
    signed = dd.Signed(exact, sig, np.ones(3, np.int32), none, np.zeros(3, np.float32))
    args = dict(lengths=np.ones(3, np.int64), use_exact=False)
    plan = dd.plan_dedup(signed, **args, threshold=0.72)
    assert plan.status.tolist() == [dd.KEPT, dd.KEPT, dd.NEAR]
    assert plan.stats["candidate_pairs"] == 3 and plan.stats["rejected_pairs"] == 2
    assert plan.similarity[2] == pytest.approx(107 / 112)
    loose = dd.plan_dedup(signed, **args, threshold=0.72, verify=False)
    assert loose.status.tolist() == [dd.KEPT, dd.NEAR, dd.NEAR]


# Any text parse_raw lets through (no lone surrogates), with separators, digits and marks.
ANY_TEXT = st.lists(
    st.one_of(
        st.text(st.characters(exclude_categories=["Cs"]), max_size=10),
        st.sampled_from([" ", "\n", "\x00", "\u2028", "_", "3.14", "e\u0301", "İ", "ß", "!!"]),
    ),
    max_size=30,
).map("".join)


@settings(max_examples=100, deadline=None)
@given(st.lists(ANY_TEXT, max_size=5))
def test_simplify_shingles_and_signatures_on_any_text(texts: list[str]) -> None:
    simple = [dd.simplify(t) for t in texts]
    assert [dd.simplify(s) for s in simple] == simple  # a fixed point: one space between words
    hashes, doc = dd.shingle_hashes(simple, 5)
    assert len(hashes) == len(doc)
    words = [len(s.split()) for s in simple]
    assert np.bincount(doc, minlength=len(texts)).tolist() == [
        max(w - 4, 1) if w else 0 for w in words
    ]
    signed = dd.Signer(num_perm=16).sign(texts)
    rechunked = dd.Signer(num_perm=16, chunk_bytes=8).sign(texts)
    alone = [dd.Signer(num_perm=16).sign([t]) for t in texts]
    for name in ("exact", "sig", "shingles"):
        got = getattr(signed, name)
        assert np.array_equal(got, getattr(rechunked, name)), name
        for i, one in enumerate(alone):  # a document's signature ignores its neighbours
            assert np.array_equal(got[i], getattr(one, name)[0]), name
