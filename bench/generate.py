"""Decode speed on CPU: llmctl's `generate` vs transformers' `generate` on the same weights.

For the `small` preset (mapped to transformers' Llama) and the GPT-2 124M shape (mapped to
GPT2LMHeadModel), random init, greedy, the same prompt and the same number of new tokens
(no eos, so both produce exactly that many): batch-1 tokens/s and batch-8 throughput, with
both sides in float32 and both in bfloat16 (llmctl's default on CPUs with native bf16
matmuls, where batch-1 decoding is bound by the bytes of weights streamed per token). The
time covers the whole call (prefill of a short prompt included); each side gets one warm-up
call, then the best of `--repeats` runs is kept. The tokens of both sides are compared.

    .venv/bin/python bench/generate.py [--quick] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

from llmctl.model.gpt import GPT, preset
from llmctl.model.hf import to_hf_gpt2, to_hf_llama
from llmctl.model.sample import GenerationParams, Stops, generate

MODELS = {"small": ("small", to_hf_llama), "gpt2-124m": ("gpt2-124m", to_hf_gpt2)}


def best_times(fns: list[Callable[[], object]], repeats: int) -> list[tuple[float, object]]:
    """Best wall time of each function; runs are interleaved (a, b, a, b, ...) after one
    warm-up call each, so a load spike from other processes hits both sides alike."""
    outs = [fn() for fn in fns]  # warm-up: allocator, kernels, lazy imports
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return list(zip(best, outs, strict=True))


def run(
    name: str, dtype: torch.dtype, batch: int, prompt_len: int, new: int, repeats: int
) -> dict[str, object]:
    torch.manual_seed(0)
    model = GPT(preset(MODELS[name][0])).eval()
    hf = MODELS[name][1](model).to(dtype)
    model.to(dtype)
    vocab = model.config.vocab_size
    ids = torch.randint(8, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    params = GenerationParams(max_new_tokens=new)
    stops = Stops(new)

    def ours() -> list[list[int]]:
        return [r[0].tokens for r in generate(model, ids.tolist(), params, stops=stops)]

    def theirs() -> list[list[int]]:
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)  # fmt: skip
        return out[:, prompt_len:].tolist()

    (t_ours, a), (t_hf, b) = best_times([ours, theirs], repeats)
    return {
        "model": name,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "new tokens": new,
        "llmctl tok/s": batch * new / t_ours,
        "transformers tok/s": batch * new / t_hf,
        "ratio": t_hf / t_ours,
        "same tokens": a == b,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens, one repeat")
    ap.add_argument("--markdown", action="store_true", help="print rows for docs/benchmarks.md")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    new, repeats = (32, 2) if args.quick else (128, 3)
    dtypes = (torch.float32, torch.bfloat16)
    rows = [run(m, d, b, 16, new, repeats) for m in args.models for d in dtypes for b in (1, 8)]
    cols = list(rows[0])
    fmt = {float: "{:,.1f}", bool: "{}", int: "{}", str: "{}"}
    lines = [[fmt[type(r[c])].format(r[c]) for c in cols] for r in rows]
    where = (
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, load {os.getloadavg()[0]:.2f}"
    )
    if args.markdown:
        print(f"<!-- bench/generate.py{' --quick' if args.quick else ''}: {where} -->")
        print("| " + " | ".join(cols) + " |")
        print("|" + "---|" * len(cols))
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(cols)]
    print(where)
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for line in lines:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))


if __name__ == "__main__":
    sys.exit(main())
