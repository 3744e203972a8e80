"""Decode speed on CPU: llmctl's `generate` vs transformers' `generate` on the same weights.

For the `small` preset (mapped to transformers' Llama) and the GPT-2 124M shape (mapped to
GPT2LMHeadModel), random init, greedy, the same prompt and the same number of new tokens
(no eos, so both produce exactly that many): batch-1 tokens/s and batch-8 throughput, with
both sides in float32 and both in bfloat16 (llmctl's default on CPUs with native bf16
matmuls, where batch-1 decoding is bound by the bytes of weights streamed per token). The
time covers the whole call (prefill of a short prompt included); each side gets one warm-up
call, then the best of `--repeats` runs is kept. The tokens of both sides are compared.

    .venv/bin/python bench/generate.py [--quick] [--markdown]

`--device cuda`: the GPT-2 124M shape in bf16, greedy, 256 new tokens after a 16-token
prompt: llmctl (static KV cache replayed as CUDA graphs; and with `cuda_graphs` off) against
transformers' `generate` with its default cache and with `cache_implementation="static"`, at
batch 1, 32 and 128; and two Llama shapes of ≥ 1B parameters (TinyLlama's 1.1B: d 2048, 22
layers, GQA 32/4; Llama-2-7B's: d 4096, 32 layers) at batch 1 with the fraction of the H200's
4.8 TB/s they reach (bytes read per token × tokens/s; `bytes_per_token`).

    python3 bench/generate.py --device cuda [--markdown]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# On the GPU machine the package is not installed: import it from the checkout.
sys.path.append(str(Path(__file__).resolve().parent.parent / "src"))

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


HBM_BYTES_PER_S = 4.8e12  # H200
# ≥ 1B-parameter Llama shapes for the bandwidth rows: TinyLlama's and Llama-2-7B's
BIG = {
    "llama 1.1B": dict(n_layer=22, d_model=2048, n_head=32, n_kv_head=4, d_ff=5632,
                       max_seq_len=2048),
    "llama 7B": dict(n_layer=32, d_model=4096, n_head=32, n_kv_head=32, d_ff=11008,
                     max_seq_len=4096),
}  # fmt: skip


def bytes_per_token(model: GPT, kv_len: float) -> float:
    """HBM bytes one batch-1 decoding step must read: every weight but an untied input
    embedding (one row of it is read), and the K and V of `kv_len` cached positions."""
    weights = sum(
        p.numel() * p.element_size()
        for n, p in model.named_parameters()
        if n != "tok_emb.weight" or model.config.tie_embeddings
    )
    cfg = model.config
    kv = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * model.tok_emb.weight.element_size()
    return weights + kv * kv_len


def graph_step_seconds(model: GPT, prompt_len: int, new: int) -> float:
    """Device time of one batch-1 decoding step alone: `new` replays of the CUDA graph queued
    back to back with one sync at the end, so the host's per-token work (choosing the token,
    stop checks) is left out. Its gap to the end-to-end rate is that host work."""
    from llmctl.model.sample import Runner

    with torch.inference_mode():
        best = float("inf")
        for _ in range(2):
            runner = Runner(model, [list(range(8, 8 + prompt_len))], new, static=True)
            runner.prefill()
            token = torch.full((1, 1), 9, dtype=torch.long, device="cuda")
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(new):
                runner.feed(token)
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - start) / new)
    return best


def cuda_rows(quick: bool) -> list[dict[str, object]]:
    """The GPU table (see the module docstring); each side warmed up, then best of 2 runs."""
    import transformers

    rows: list[dict[str, object]] = []
    new, prompt_len = (64, 16) if quick else (256, 16)

    def timed(fns: list[Callable[[], object]]) -> list[tuple[float, object]]:
        def sync(fn: Callable[[], object]) -> Callable[[], object]:
            def run() -> object:
                out = fn()
                torch.cuda.synchronize()
                return out

            return run

        return best_times([sync(f) for f in fns], 1 if quick else 2)

    def sides(model: GPT, hf: object, batch: int, hf_static: bool) -> dict[str, object]:
        ids = torch.randint(8, model.config.vocab_size, (batch, prompt_len),
                            generator=torch.Generator().manual_seed(1)).cuda()  # fmt: skip
        stops = Stops(new)

        def ours(graphs: bool) -> Callable[[], object]:
            params = GenerationParams(max_new_tokens=new, cuda_graphs=graphs)
            # decode_layout, as the `generate` command passes it (packed q/k/v, gate/up)
            return lambda: [
                r[0].tokens
                for r in generate(model, ids.tolist(), params, stops=stops, decode_layout=True)
            ]

        def theirs(static: bool) -> Callable[[], object]:
            kw = {"cache_implementation": "static"} if static else {}

            def run() -> object:
                with torch.inference_mode():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids),  # type: ignore[attr-defined]
                                      max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                      pad_token_id=0, **kw)  # fmt: skip
                return out[:, prompt_len:].tolist()

            return run

        fns = [ours(True), ours(False), theirs(False)] + ([theirs(True)] if hf_static else [])
        res = timed(fns)
        rate = [batch * new / t for t, _ in res]
        row = {"batch": batch, "llmctl tok/s": rate[0], "llmctl, no graphs": rate[1],
               "transformers tok/s": rate[2]}  # fmt: skip
        row["transformers static"] = rate[3] if hf_static else float("nan")
        row["ratio"] = rate[0] / max(rate[2:])
        row["same tokens"] = res[0][1] == res[2][1]
        return row

    torch.manual_seed(0)
    model = GPT(preset("gpt2-124m")).eval().cuda()
    hf = to_hf_gpt2(model).to(torch.bfloat16)
    model.to(torch.bfloat16)
    for batch in (1, 32, 128):
        rows.append({"model": "gpt2-124m bf16", **sides(model, hf, batch, hf_static=batch == 1)})
        print(rows[-1], flush=True)  # a long GPU run keeps what it measured so far
    del model, hf
    for name, shape in BIG.items():
        torch.cuda.empty_cache()
        torch.manual_seed(0)
        with torch.device("cuda"):  # initialized on the GPU: seconds, not minutes, for 7B
            big = GPT(preset("llama-style", **shape)).to(torch.bfloat16).eval()
            hfb = to_hf_llama(big)
        row = sides(big, hfb, 1, hf_static=False)
        read = bytes_per_token(big, prompt_len + new / 2)  # the mean KV length over the run
        row["% of HBM"] = 100 * row["llmctl tok/s"] * read / HBM_BYTES_PER_S
        step = graph_step_seconds(big, prompt_len, new)
        row["graph step ms"] = step * 1e3
        row["% of HBM, graph step"] = 100 * read / step / HBM_BYTES_PER_S
        rows.append({"model": f"{name} bf16 ({read / 1e9:.2f} GB read per token)", **row})
        print(rows[-1], flush=True)
        del big, hfb
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name()}")  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens, one repeat")
    ap.add_argument("--markdown", action="store_true", help="print rows for docs/benchmarks.md")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    if args.device == "cuda":
        rows = cuda_rows(args.quick)
    else:
        new, repeats = (32, 2) if args.quick else (128, 3)
        dtypes = (torch.float32, torch.bfloat16)
        rows = [run(m, d, b, 16, new, repeats) for m in args.models for d in dtypes for b in (1, 8)]
    cols = list(dict.fromkeys(c for r in rows for c in r))
    fmt = {float: "{:,.1f}", bool: "{}", int: "{}", str: "{}"}
    lines = [[fmt[type(r[c])].format(r[c]) if c in r else "-" for c in cols] for r in rows]
    where = (
        f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
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
