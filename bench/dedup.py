"""Speed and memory of `llmctl dedup`, against a plain per-document datasketch loop.

Corpus: documents synthesized from real web text (the sentences of ../shared/data/web C4,
CCNet and Dolma samples, drawn at random, 5–25 per document, one paragraph break every few
sentences), of which 10% are close variants of an earlier document (1% of words substituted),
so the command has real clusters to find. Written to bench/out/dedup/ (not shipped).

Measured in one run:
- signatures, one core, in process: our `Signer` (simplify + vectorized MinHash + exact key)
  vs `datasketch.MinHash.update` called per shingle (same simplification, same word 5-grams,
  same num_perm), and datasketch's `update_batch` per document for reference;
- the whole command (two passes, clustering, writing) with 1 and 2 workers: docs/s, MB/s per
  core, peak RSS (the largest process, from /usr/bin/time);
- peak RSS at N and 3N documents, extrapolated linearly to 1M documents.

Run: .venv/bin/python bench/dedup.py [--quick] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from llmctl.data.dedup import Signer, simplify

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
WEB = REPO.parent / "shared" / "data" / "web"
OUT = ROOT / "out" / "dedup"
NUM_PERM, NGRAM = 112, 5


def sentences() -> list[str]:
    import gzip

    files = [WEB / "c4_demo" / "c4_demo.jsonl", *sorted((WEB / "ccnet_head_sample").glob("*"))]
    lines = [line for f in files if f.suffix == ".jsonl" for line in f.open(encoding="utf-8")]
    with gzip.open(WEB / "dolma_paragraph_dedup" / "documents.jsonl.gz", "rt") as f:
        lines += f.readlines()
    out = []
    for line in lines:
        for s in re.split(r"(?<=[.!?])\s+", json.loads(line)["text"]):
            if len(s.split()) >= 4:
                out.append(s.replace("\n", " "))
    return out


def make_corpus(path: Path, n: int, pool: list[str], seed: int = 0) -> int:
    """Write n docs as JSONL; returns the text bytes."""
    if path.exists() and path.with_suffix(".bytes").exists():
        return int(path.with_suffix(".bytes").read_text())
    rng = random.Random(seed)
    total, recent = 0, []
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            if recent and rng.random() < 0.10:
                words = rng.choice(recent).split(" ")
                for j in rng.sample(range(len(words)), max(1, len(words) // 100)):
                    words[j] = "edited"
                text = " ".join(words)
            else:
                picked = rng.choices(pool, k=rng.randint(5, 25))
                text = "".join(s + ("\n" if k % 4 == 3 else " ") for k, s in enumerate(picked))
                text = text.strip()
                recent = [*recent[-999:], text]
            f.write(json.dumps({"id": f"d{i}", "text": text}) + "\n")
            total += len(text.encode())
    path.with_suffix(".bytes").write_text(str(total))
    return total


def load_texts(path: Path, n: int) -> list[str]:
    out = []
    with path.open(encoding="utf-8") as f:
        for line, _ in zip(f, range(n), strict=False):
            out.append(json.loads(line)["text"])
    return out


def ours(texts: list[str]) -> float:
    signer = Signer(NUM_PERM, 1, NGRAM)
    t0 = time.perf_counter()
    for i in range(0, len(texts), 256):
        signer.sign(texts[i : i + 256])
    return time.perf_counter() - t0


def _shingles(text: str) -> list[bytes]:
    words = simplify(text).split()
    grams = [" ".join(words[i : i + NGRAM]) for i in range(max(len(words) - NGRAM + 1, 1))]
    return [g.encode() for g in grams if g]


def datasketch_loop(texts: list[str], batch: bool) -> float:
    from datasketch import MinHash

    t0 = time.perf_counter()
    for text in texts:
        m = MinHash(num_perm=NUM_PERM)
        if batch:
            m.update_batch(_shingles(text))
        else:
            for s in _shingles(text):
                m.update(s)
        m.digest()
    return time.perf_counter() - t0


def command(src: Path, workers: int, tag: str) -> dict:
    """Run the CLI under /usr/bin/time; wall seconds, peak RSS (MiB) and the manifest stats."""
    out = OUT / f"out-{tag}"
    cmd = [str(REPO / ".venv" / "bin" / "llmctl"), "dedup", str(src), "--out", str(out)]
    cmd += ["--workers", str(workers), "--force", "--quiet"]
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"dedup failed:\n{r.stderr}")
    rss = int(r.stderr.strip().splitlines()[-1]) / 1024
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    return {"wall": wall, "rss": rss, "stats": stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k/30k docs instead of 100k/300k")
    ap.add_argument("--markdown", action="store_true", help="only the markdown tables")
    args = ap.parse_args()
    n = 10_000 if args.quick else 100_000
    OUT.mkdir(parents=True, exist_ok=True)
    pool = sentences()
    small, large = OUT / f"docs-{n}.jsonl", OUT / f"docs-{3 * n}.jsonl"
    mb_small = make_corpus(small, n, pool) / 1e6
    mb_large = make_corpus(large, 3 * n, pool) / 1e6

    sample = load_texts(small, 2_000 if args.quick else 20_000)
    base = sample[: 200 if args.quick else 1_000]
    mb = lambda ts: sum(len(t.encode()) for t in ts) / 1e6  # noqa: E731
    rows = []
    t = ours(sample)
    ours_rate = mb(sample) / t
    rows.append(("signatures: llmctl (numpy, 1 core)", len(sample) / t, ours_rate, 1.0))
    t = datasketch_loop(base, batch=False)
    loop_rate = mb(base) / t
    rows.append(("signatures: datasketch `update` per shingle", len(base) / t, loop_rate, None))
    t = datasketch_loop(base, batch=True)
    rows.append(
        ("signatures: datasketch `update_batch` per doc", len(base) / t, mb(base) / t, None)
    )
    rows = [(a, d, m, ours_rate / m) for a, d, m, _ in rows]

    runs = {}
    for workers in (1, 2):
        runs[workers] = command(small, workers, f"{n}-j{workers}")
        r = runs[workers]
        cores = min(workers, os.cpu_count() or 1)
        rows.append(
            (f"whole command, {n:,} docs, {workers} worker(s)", n / r["wall"] / cores,
             mb_small / r["wall"] / cores, None)
        )  # fmt: skip
    big = command(large, 1, f"{3 * n}-j1")
    rss_small, rss_large = runs[1]["rss"], big["rss"]
    per_doc = (rss_large - rss_small) / (2 * n)
    rss_1m = rss_large + per_doc * (1_000_000 - 3 * n)
    load = os.getloadavg()

    print(f"\nCorpus: {n:,} docs ({mb_small:.0f} MB of text) and {3 * n:,} docs "
          f"({mb_large:.0f} MB); num_perm {NUM_PERM}, word {NGRAM}-grams; load average "
          f"{load[0]:.2f} on {os.cpu_count()} cores\n")  # fmt: skip
    print("| what | docs/s per core | MB/s per core | llmctl signatures vs this |")
    print("|---|---|---|---|")
    for name, docs, mbs, ratio in rows:
        r = "—" if ratio is None or name.startswith("whole") else f"{ratio:.1f}×"
        print(f"| {name} | {docs:,.0f} | {mbs:.2f} | {r} |")
    s = runs[1]["stats"]
    print(f"\nDedup result ({n:,} docs): {s['exact_removed']:,} exact + {s['near_removed']:,} near "
          f"removed, {s['clusters']:,} clusters, largest {s['largest_cluster']}.\n")  # fmt: skip
    print("| peak RSS (largest process) | MiB |")
    print("|---|---|")
    print(f"| {n:,} docs, 1 worker | {rss_small:,.0f} |")
    print(f"| {n:,} docs, 2 workers | {runs[2]['rss']:,.0f} |")
    print(f"| {3 * n:,} docs, 1 worker | {rss_large:,.0f} |")
    print(f"| 1,000,000 docs (extrapolated: {per_doc * 1024:.2f} KiB/doc) | {rss_1m:,.0f} |")
    if not args.markdown:
        ratio, gib = ours_rate / loop_rate, rss_1m / 1024
        print(f"\nTargets: signatures ≥ 5× the update loop per core (got {ratio:.1f}×); whole "
              f"command ≥ 2 MB/s per core; 1M docs < 4 GB (got {gib:.2f} GiB).")  # fmt: skip


if __name__ == "__main__":
    main()
