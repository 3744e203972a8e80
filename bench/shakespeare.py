"""Quality per time on tiny shakespeare: llmctl's `small-gpu` recipe against nanoGPT's baby GPT.

Both sides hold out the last 10 % of `input.txt` (nanoGPT splits its characters 90/10; llmctl
tokenizes the text as one document and `--val-fraction 0.1` gives val the last 10 % of its
tokens). Both log validation loss during training; it is turned into bits per byte (nanoGPT:
nats per character / ln 2 — the text is ASCII, one byte a character; llmctl: nats per token
× val tokens / val bytes / ln 2, the bytes counted by decoding the val shard). Wall time runs
from the start of training, compilation included (nanoGPT: from the process start, read off
its log as it streams; llmctl: `wall_s` of its val records). Printed: the time each side first
reaches ≤ 2.12 bits per byte, and each side's best.

    python3 bench/shakespeare.py --device cuda [--configs a b]    # GPU machine, one run

nanoGPT's code is read from bench/peers/nanogpt/ (an ignored copy of shared/peers/nanogpt);
without it the peer column is skipped. Set up both copies with:
    mkdir -p bench/peers/tinyshakespeare && cp -r ../shared/peers/nanogpt bench/peers/ &&
    cp ../shared/data/pretrain/tinyshakespeare/input.txt bench/peers/tinyshakespeare/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The whole 1.1 MB text (shared/data/pretrain/tinyshakespeare, public domain), copied into the
# ignored bench/peers/ so that it travels to the GPU machine; tests/data holds only an excerpt.
TEXT = ROOT / "bench" / "peers" / "tinyshakespeare" / "input.txt"
PEER = ROOT / "bench" / "peers" / "nanogpt"
TARGET_BPB = 2.12
ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}

# Named variants of the small-gpu recipe (recipes/small-gpu/*.toml is the default one).
CONFIGS: dict[str, list[str]] = {
    "recipe": [],
    "long": ["--steps", "1200"],
    "nodrop": ["--set", "model.dropout=0.1"],
}


def llmctl(*args: str) -> None:
    cmd = [sys.executable, "-m", "llmctl.cli", *args]
    subprocess.run(cmd, check=True, env=ENV, cwd=ROOT)


def val_bytes_per_token(tokens: Path) -> float:
    sys.path.insert(0, str(ROOT / "src"))
    from llmctl.data.tokens import read_shard, split_shards
    from llmctl.tokenizer import decode, load_tokenizer

    tok = load_tokenizer(tokens)
    ids = [int(t) for p in split_shards(tokens, "val") for t in read_shard(p)]
    text = decode(tok, ids, skip_special_tokens=True)
    return len(text.encode("utf-8")) / len(ids)


def ours(name: str, extra: list[str], work: Path) -> dict:
    cfg = ROOT / "recipes" / "small-gpu"
    tokens = work / "tokens"
    if not tokens.exists():
        llmctl("tokenize", str(TEXT), "--out", str(tokens), "--config", str(cfg / "tokenize.toml"),
               "-q")  # fmt: skip
    out = work / f"model-{name}"
    llmctl("pretrain", str(tokens), "--out", str(out), "--config", str(cfg / "pretrain.toml"),
           *extra, "-q")  # fmt: skip
    bpt = val_bytes_per_token(tokens)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["wall_s"], r["val_loss"] / math.log(2) / bpt)
             for r in rows if "val_loss" in r]  # fmt: skip
    return {"curve": curve}


def nanogpt(work: Path, iters: int) -> dict | None:
    if not (PEER / "train.py").is_file():
        return None
    peer = work / "nanogpt"
    shutil.copytree(PEER, peer)
    data = peer / "data" / "shakespeare_char"
    shutil.copyfile(TEXT, data / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], check=True, cwd=data, capture_output=True)
    # its own config (eval every 250 iters, lr decay over 5000) cut at `iters`: the same curve
    cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py",
           f"--max_iters={iters}", "--log_interval=1000", "--dtype=bfloat16"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=peer, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)  # fmt: skip
    curve = []
    assert proc.stdout is not None
    for line in proc.stdout:
        # "step 250: train loss 1.9703, val loss 2.0705"
        if line.startswith("step ") and "val loss" in line:
            step = int(line.split()[1].rstrip(":"))
            val = float(line.rsplit("val loss", 1)[1].strip())
            curve.append((step, time.perf_counter() - start, val / math.log(2)))
    proc.wait()
    return {"curve": curve}


def summarize(name: str, res: dict) -> tuple[str, str, str]:
    curve = res["curve"]
    first = next(((s, t) for s, t, b in curve if b <= TARGET_BPB), None)
    best = min(curve, key=lambda r: r[2])
    reach = f"{first[1]:.1f} s (step {first[0]})" if first else "never"
    return name, reach, f"{best[2]:.4f} at step {best[0]} ({best[1]:.1f} s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda"])
    ap.add_argument("--configs", nargs="+", default=["recipe"], choices=list(CONFIGS))
    ap.add_argument("--peer-iters", type=int, default=2500)
    ap.add_argument("--json", type=Path, help="also write the curves here")
    args = ap.parse_args()
    rows, curves = [], {}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        for name in args.configs:
            curves[f"llmctl {name}"] = ours(name, CONFIGS[name], work)
        peer = nanogpt(work, args.peer_iters)
        if peer is not None:
            curves["nanoGPT baby GPT"] = peer
    for name, res in curves.items():
        rows.append(summarize(name, res))
    if args.json:
        args.json.write_text(json.dumps(curves, indent=1))
    print(f"| side | first val bpb <= {TARGET_BPB} | best val bpb |\n|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
