"""Benchmark `llmctl tokenize`: encoding MB/s against raw HF `tokenizers`, and training cost.

    .venv/bin/python bench/tokenizer.py [--quick] [--markdown] [--mb 50]

Builds `bench/out/tokenize/corpus-<MB>mb.jsonl` by repeating the real text under
../shared/data (pretrain/* and web/c4_demo; about 6 MB of unique text) up to the size asked.
Then, in one run, on the same documents and the same trained 8k tokenizer:

- raw: `Tokenizer.encode_batch_fast(texts)` + `.ids` on 1024-document batches, texts already in
  memory, in a subprocess with RAYON_NUM_THREADS=1 and =2 (encode_batch is threaded by Rayon);
- ours: the whole encode pass of `llmctl tokenize --tokenizer T --workers 1|2` (read JSONL,
  parse, split, encode, write shards), MB/s from the manifest's `encode_s`, plus the
  command's total wall time;
- training: pass 1 (the hash-ordered sample) + BPE training at 8k and 32k vocabularies on
  the whole corpus (`doc_chars=0`), each in a fresh subprocess, with its peak RSS.

Targets (issue 4): ours ≥ 0.9× raw at the same core count; ours 2 workers ≥ 1.8× ours 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "out" / "tokenize"
PY = sys.executable
LLMCTL = str(Path(PY).parent / "llmctl")


def unique_docs() -> list[str]:
    """Real documents: paragraphs of the plain-text corpora, and the C4 web pages."""
    docs: list[str] = []
    for path in sorted((SHARED / "pretrain").rglob("*.txt")):
        text = path.read_text(encoding="utf-8")
        sep = "\n" if "wiki_demo" in path.name else "\n\n"  # wiki_demo: one article per line
        docs.extend(p.strip("\n") for p in text.split(sep) if p.strip())
    for line in (SHARED / "web" / "c4_demo" / "c4_demo.jsonl").read_text("utf-8").splitlines():
        docs.append(json.loads(line)["text"])
    return docs


def build_corpus(mb: int) -> tuple[Path, int, int]:
    """The JSONL corpus of at least `mb` MB; returns its path, text bytes and unique bytes."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"corpus-{mb}mb.jsonl"
    docs = unique_docs()
    unique = sum(len(d.encode()) for d in docs)
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        total, copy = 0, 0
        with open(tmp, "w", encoding="utf-8") as f:
            while total < mb * 1_000_000:
                for i, d in enumerate(docs):
                    f.write(json.dumps({"id": f"{copy}:{i}", "text": d}, ensure_ascii=False) + "\n")
                    total += len(d.encode())
                copy += 1
        tmp.replace(path)
    texts = load_texts(path)
    return path, sum(len(t.encode()) for t in texts), unique


def load_texts(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- subprocess entry points ------------------------------------------------------------------


def child_raw(tok_path: str, corpus: str) -> None:
    """Raw tokenizers: encode_batch_fast over 1024-doc batches; prints JSON."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tok_path)
    tok.encode_special_tokens = True  # same setting as ours
    texts = load_texts(Path(corpus))
    nbytes = sum(len(t.encode()) for t in texts)
    t0, c0 = time.perf_counter(), time.process_time()
    ntok = 0
    for i in range(0, len(texts), 1024):
        ids = [e.ids for e in tok.encode_batch_fast(texts[i : i + 1024], add_special_tokens=False)]
        ntok += sum(map(len, ids))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(
        json.dumps(
            {"s": dt, "mb_s": nbytes / 1e6 / dt, "mb_cpu_s": nbytes / 1e6 / cpu, "tokens": ntok}
        )
    )


def child_train(vocab: int, corpus: str) -> None:
    """Our training path (pass 1 sample + BPE), as `llmctl tokenize` runs it; prints JSON."""
    from llmctl.data.corpus import SplitRule, training_sample
    from llmctl.data.docs import ReadOptions
    from llmctl.tokenizer import train_tokenizer

    t0 = time.perf_counter()
    sample, _ = training_sample([Path(corpus)], ReadOptions(), SplitRule(), 10**12, 0)
    texts = sample.texts()
    t1 = time.perf_counter()
    tok = train_tokenizer(texts, vocab)
    t2 = time.perf_counter()
    nbytes = sum(len(t.encode()) for t in texts)
    print(
        json.dumps(
            {
                "sample_s": t1 - t0,
                "train_s": t2 - t1,
                "bytes": nbytes,
                "vocab": tok.get_vocab_size(),
                "peak_rss_mb": peak_rss_mb(),
            }
        )
    )


# --- the benchmark ----------------------------------------------------------------------------


def run_json(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def ours(corpus: Path, tok_dir: Path, workers: int) -> dict:
    """The whole command in a subprocess; its CPU time includes startup and all workers."""
    out = OUT / f"tokens-w{workers}"
    t0, c0 = time.perf_counter(), children_cpu()
    cmd = [LLMCTL, "tokenize", str(corpus), "--out", str(out), "--force", "--quiet"]
    subprocess.run([*cmd, "--tokenizer", str(tok_dir), "--workers", str(workers)], check=True)
    wall, cpu = time.perf_counter() - t0, children_cpu() - c0
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    mb = stats["text_bytes"] / 1e6
    return {"mb_s": stats["encode_mb_s"], "wall_s": wall, "mb_cpu_s": mb / cpu, "stats": stats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 MB corpus, for development")
    ap.add_argument("--mb", type=int, default=50, help="corpus size in MB (default 50)")
    ap.add_argument("--markdown", action="store_true", help="print rows for docs/benchmarks.md")
    ap.add_argument("--child-raw", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--child-train", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_raw:
        return child_raw(*args.child_raw)
    if args.child_train:
        return child_train(int(args.child_train[0]), args.child_train[1])

    mb = 5 if args.quick else args.mb
    corpus, nbytes, unique = build_corpus(mb)
    print(f"corpus {corpus.name}: {nbytes / 1e6:.1f} MB of text ({unique / 1e6:.1f} MB unique)")
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} on {os.cpu_count()} cores")

    rows: list[tuple[str, str, str, str]] = []
    train = {}
    for vocab in (8192, 32768):
        r = run_json([PY, __file__, "--child-train", str(vocab), str(corpus)])
        train[vocab] = r
        rate = r["bytes"] / 1e6 / r["train_s"]
        rows.append(
            (
                f"train {vocab // 1024}k BPE on {r['bytes'] / 1e6:.0f} MB",
                f"{r['sample_s']:.1f} s sample + {r['train_s']:.1f} s train ({rate:.1f} MB/s), "
                f"peak RSS {r['peak_rss_mb']:,.0f} MB",
                "",
                "",
            )
        )
        print(rows[-1])

    # The tokenizer both sides encode with: ours at 8k, trained on this corpus.
    tok_dir = OUT / "tok8k"
    if tok_dir.exists():
        shutil.rmtree(tok_dir)
    cmd = [LLMCTL, "tokenize", str(corpus), "--out", str(tok_dir), "--quiet", "--workers", "2"]
    subprocess.run([*cmd, "--set", "doc_chars=0"], check=True)
    tok_json = str(tok_dir / "tokenizer.json")

    enc = {}
    for n in (1, 2):
        env = {**os.environ, "RAYON_NUM_THREADS": str(n)}
        env.pop("TOKENIZERS_PARALLELISM", None)
        raw = run_json([PY, __file__, "--child-raw", tok_json, str(corpus)], env=env)
        mine = ours(corpus, tok_dir, n)
        enc[n] = (raw, mine)
        rows.append(
            (
                f"encode, {n} core{'s' if n > 1 else ''}, MB/s (wall)",
                f"{mine['mb_s']:.2f} (whole command {nbytes / 1e6 / mine['wall_s']:.2f})",
                f"{raw['mb_s']:.2f}",
                f"{mine['mb_s'] / raw['mb_s']:.2f}×",
            )
        )
        print(rows[-1])
        rows.append(
            (
                f"encode, {n} core{'s' if n > 1 else ''}, MB per CPU-second",
                f"{mine['mb_cpu_s']:.2f} (whole command)",
                f"{raw['mb_cpu_s']:.2f} (encode loop)",
                f"{mine['mb_cpu_s'] / raw['mb_cpu_s']:.2f}×",
            )
        )
        print(rows[-1])
    s = enc[1][1]["stats"]
    rows.append(
        (
            "encode scaling 1 → 2 cores (wall)",
            f"{enc[2][1]['mb_s'] / enc[1][1]['mb_s']:.2f}×",
            f"{enc[2][0]['mb_s'] / enc[1][0]['mb_s']:.2f}×",
            "",
        )
    )
    rows.append(("bytes per token (8k)", f"{s['bytes_per_token']:.3f}", "", ""))
    assert enc[1][0]["tokens"] == sum(s["tokens"].values()) - sum(s["docs"].values())

    print()
    print(f"load after: {os.getloadavg()[0]:.2f}   peer = raw tokenizers encode_batch_fast")
    print(f"{'measure':40} {'ours':48} {'peer':24} ratio")
    for row in rows:
        print(f"{row[0]:40} {row[1]:48} {row[2]:24} {row[3]}")
    if args.markdown:
        print("\n| measure | ours | peer | ratio |\n|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
