"""RWKV-4 vs the transformer, side by side: quality at equal parameters and steps, and decoding
cost as the context grows.

1. Quality: the demo corpus (recipes/data through `clean`, `dedup`, `tokenize` with the
   recipes/small configs, or `--tokens DIR`), then `llmctl pretrain` of `small` (GPT) and
   `rwkv-small` (the same non-embedding parameters) with identical settings (steps, batch,
   seq_len, lr, seed), then `llmctl eval` of both on the val split: val loss and bits per byte,
   plus training tokens per CPU-second (one thread each; CPU time, not wall time, because this
   machine is shared). On CPU keep `--steps` modest: the figures are early-training ones.
2. Decoding: random-weight `small` and `rwkv-small` built for a 4,096-token context (vocab
   4,096, float32, batch 1). For each context N the cache holds N - `--new` tokens (random
   keys/values for the transformer, a random state for RWKV: the per-token cost depends on the
   cache's length, not its content, so no prefill is timed), then `--new` greedy tokens are
   decoded one forward at a time: tokens per CPU-second and the bytes of the KV cache /
   recurrent state per sequence. RWKV's cost and memory stay flat; the transformer's grow with N.

    .venv/bin/python bench/rwkv.py [--steps 50] [--tokens DIR] [--skip-train] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmctl.model.gpt import GPT
from llmctl.model.gpt import preset as gpt_preset
from llmctl.model.rwkv import RWKV, RWKVState
from llmctl.model.rwkv import preset as rwkv_preset

ROOT = Path(__file__).resolve().parent.parent
LLMCTL = str(Path(sys.executable).parent / "llmctl")


def sh(*args: object) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env)
    if res.returncode:
        sys.exit(f"failed: {' '.join(map(str, args))}\n{res.stderr[-2000:]}")
    return res.stdout


def cpu_children() -> float:
    """CPU seconds used by finished child processes: this machine is shared, so wall time
    measures the neighbours as much as the code."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def demo_tokens(work: Path) -> Path:
    """The demo corpus through the real chain with recipes/small's settings."""
    cfg = ROOT / "recipes" / "small"
    sh(LLMCTL, "clean", ROOT / "recipes" / "data", "--out", work / "clean",
       "--config", cfg / "clean.toml", "-q")  # fmt: skip
    sh(LLMCTL, "dedup", work / "clean", "--out", work / "dedup", "--config", cfg / "dedup.toml",
       "-q")  # fmt: skip
    sh(LLMCTL, "tokenize", work / "dedup", "--out", work / "tokens",
       "--config", cfg / "tokenize.toml", "-q")  # fmt: skip
    return work / "tokens"


def quality(tokens: Path, work: Path, steps: int, batch: int, seq_len: int) -> list[dict]:
    rows = []
    for preset in ("small", "rwkv-small"):
        out = work / preset
        t0 = cpu_children()
        sh(LLMCTL, "pretrain", tokens, "--out", out, "--preset", preset, "--steps", steps,
           "--batch-size", batch, "--seq-len", seq_len, "--lr", "1e-3", "--device", "cpu",
           "--set", f"warmup={max(steps // 10, 1)}", "--set", "eval_every=0",
           "--set", f"save_every={steps}", "-q")  # fmt: skip
        cpu = cpu_children() - t0
        stats = json.loads((out / "manifest.json").read_text())["stats"]
        ev = json.loads(sh(LLMCTL, "eval", out, tokens, "--json", "--device", "cpu", "-q"))
        rows.append({
            "model": preset, "params": stats["params"],
            "params_non_embedding": stats["params_non_embedding"],
            "train_loss": stats["train_loss"], "val_loss": ev["loss"],
            "bits_per_byte": ev["bits_per_byte"], "tokens_per_s": stats["tokens_per_s"],
            "cpu_s": cpu, "val_tokens": ev["tokens"],
            "train_tokens": steps * batch * seq_len,
        })  # fmt: skip
    return rows


def cache_bytes(cache: object) -> int:
    """Bytes of the per-sequence decoding memory the cache holds at its current length."""
    if isinstance(cache, RWKVState):
        tensors = [*cache.att_x, *cache.ffn_x, *(t for s in cache.wkv for t in s)]
        return sum(t.nbytes for t in tensors)
    per_slot = sum(t[:, :, :1].nbytes for t in (*cache.k, *cache.v))  # type: ignore[attr-defined]
    return per_slot * cache.length  # type: ignore[attr-defined]


@torch.inference_mode()
def decode_speed(model: torch.nn.Module, context: int, new: int, repeats: int) -> tuple[float, int]:
    """(tokens per CPU-second, cache bytes at `context`) decoding `new` tokens after
    context - new (CPU time of this process: the shared machine's load does not count)."""
    gen = torch.Generator().manual_seed(0)
    best = float("inf")
    for _ in range(repeats):
        cache = model.make_cache(1, context)  # type: ignore[operator]
        past = context - new
        if isinstance(cache, RWKVState):
            for s in cache.wkv:
                s[0].normal_(generator=gen), s[2].normal_(generator=gen)
        else:
            for t in (*cache.k, *cache.v):
                t[:, :, :past].normal_(generator=gen)
            cache.positions[:, :past] = torch.arange(past)
        cache.length = past
        tok = torch.tensor([[1]])
        t0 = time.process_time()
        for _ in range(new):
            tok = model(tok, cache=cache)[:, -1:].argmax(-1)
        best = min(best, time.process_time() - t0)
    return new / best, cache_bytes(cache)


def decoding(contexts: list[int], new: int, repeats: int) -> list[dict]:
    torch.set_num_threads(1)  # CPU time of one thread is the cost measure
    torch.manual_seed(0)
    models = {
        "small": GPT(gpt_preset("small", vocab_size=4096, max_seq_len=4096)).eval(),
        "rwkv-small": RWKV(rwkv_preset("rwkv-small", vocab_size=4096, max_seq_len=4096)).eval(),
    }
    for m in models.values():
        m.use_decode_layout(1)
    rows = []
    for n in contexts:
        row: dict = {"context": n}
        for name, m in models.items():
            row[name] = decode_speed(m, n, new, repeats)
        rows.append(row)
        print(f"  context {n}: {row}", file=sys.stderr, flush=True)
    return rows


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--tokens", type=Path, help="a tokens artifact (default: build the demo's)")
    ap.add_argument("--skip-train", action="store_true", help="only the decoding comparison")
    ap.add_argument("--new", type=int, default=32, help="tokens decoded per context")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores", file=sys.stderr)  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench-rwkv-") as tmp:
        work = Path(tmp)
        if not args.skip_train:
            tokens = args.tokens or demo_tokens(work)
            q = quality(tokens, work, args.steps, args.batch_size, args.seq_len)
            print(f"\nQuality: {args.steps} steps × {args.batch_size} × {args.seq_len} tokens, "
                  "lr 1e-3, CPU\n")  # fmt: skip
            print("| model | params (non-emb.) | train loss | val loss | val bits/byte | "
                  "train tokens per CPU-s |\n|---|---|---|---|---|---|")  # fmt: skip
            for r in q:
                print(f"| `{r['model']}` | {r['params'] / 1e6:.2f}M "
                      f"({r['params_non_embedding'] / 1e6:.2f}M) | {r['train_loss']:.3f} | "
                      f"{r['val_loss']:.3f} | {r['bits_per_byte']:.3f} | "
                      f"{r['train_tokens'] / r['cpu_s']:,.0f} |")  # fmt: skip
            g, r = q
            print(f"\nRWKV / GPT: val bits/byte {r['bits_per_byte'] / g['bits_per_byte']:.3f}×, "
                  f"training CPU time {r['cpu_s'] / g['cpu_s']:.2f}×")  # fmt: skip

    d = decoding([256, 512, 1024, 2048, 4096], args.new, args.repeats)
    print(f"\nDecoding: batch 1, float32, 1 thread, {args.new} greedy tokens after a cache of "
          f"context - new tokens, tokens per CPU-second, best of {args.repeats}\n")  # fmt: skip
    print("| context | GPT `small` tok/CPU-s | RWKV tok/CPU-s | RWKV / GPT | GPT KV cache "
          "| RWKV state |\n|---|---|---|---|---|---|")  # fmt: skip
    for row in d:
        (gs, gb), (rs, rb) = row["small"], row["rwkv-small"]
        print(f"| {row['context']:,} | {gs:,.1f} | {rs:,.1f} | {rs / gs:.2f}× | {mib(gb)} | "
              f"{mib(rb)} |")  # fmt: skip


if __name__ == "__main__":
    main()
