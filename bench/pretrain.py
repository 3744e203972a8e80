"""Training-step throughput: llmctl's loop against Hugging Face transformers' GPT-2, same run.

CPU (default): the same GPT-2-shaped model (learned positions, LayerNorm, GELU, biases, tied
embeddings) trained for the same steps on the same batches, fp32, AdamW (same hyper-parameters,
clipping at 1.0) — ours through `llmctl.train.loop.train` (the real loop: finite checks,
metrics, everything), theirs through a plain PyTorch loop over `GPT2LMHeadModel` initialized
with the same weights (`model/hf.py: to_hf_gpt2`). Tokens/s excludes the first (warm-up) step;
each side runs `--rounds` times alternately and keeps its best.

`--device cuda`: the GPT-2 124M shape (vocab padded to 50304 as nanoGPT pads it), T = 1024,
random tokens, bf16 autocast, torch.compile, fused AdamW, clipping at 1.0 — our real loop
against nanoGPT's `model.py` in a loop like its train.py (compiled, fused AdamW, clipping, no
host sync per step), same batch, same optimizer settings, in one run: tokens/s, MFU by the
6N + 12·L·d·T convention against the device's dense bf16 peak, and the ratio. A lever row
runs our loop with the loss computed outside the compiled forward (as before issue [14]).
The peer's code is read from bench/peers/nanogpt/ (an ignored copy of shared/peers/nanogpt);
without it the peer column is skipped.

    .venv/bin/python bench/pretrain.py [--quick] [--markdown]
    python3 bench/pretrain.py --device cuda [--steps 60] [--batches 16 32]
"""

from __future__ import annotations

import sys
from pathlib import Path

# On the GPU machine the package is not installed: import it from the checkout.
sys.path.append(str(Path(__file__).resolve().parent.parent / "src"))

import argparse
import json
import math
import tempfile
import time

import numpy as np
import torch

from llmctl.model.gpt import GPT, GPTConfig, preset
from llmctl.runtime import set_quiet
from llmctl.train.batches import StepBatches
from llmctl.train.loop import Writer, peak_flops, train
from llmctl.train.objectives import NextToken
from llmctl.train.settings import TrainSettings

LR, BETAS, WD, CLIP = 6e-4, (0.9, 0.95), 0.1, 1.0


def source(vocab: int, batch: int, seq: int):
    """Random tokens; micro-batch i is the same on both sides."""

    def get(i: int) -> np.ndarray:
        return np.random.default_rng([1, i]).integers(0, vocab, (batch, seq + 1))

    return get


def ours(cfg: GPTConfig, batch: int, seq: int, steps: int, device: str, compile: bool,
         objective: NextToken | None = None) -> dict:  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    tcfg = TrainSettings(
        steps=steps, lr=LR, warmup=0, weight_decay=WD, betas=list(BETAS), clip=CLIP,
        log_every=1 if device == "cpu" else 10, save_every=0, compile=compile,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        res = train(model, StepBatches(source(cfg.vocab_size, batch, seq)),
                    objective or NextToken(), tcfg,
                    Writer(d, {}), flops_per_token=model.flops_per_token(seq))  # fmt: skip
        first = json.loads((Path(d) / "metrics.jsonl").read_text().splitlines()[0])
    return {"tokens_per_s": res.tokens_per_s, "mfu": res.mfu, "loss": first["loss"]}


def theirs(cfg: GPTConfig, batch: int, seq: int, steps: int) -> dict:
    from llmctl.model.hf import to_hf_gpt2
    from llmctl.train.optim import build_optimizer

    torch.manual_seed(0)
    hf = to_hf_gpt2(GPT(cfg)).train()
    opt = build_optimizer(hf, lr=LR, weight_decay=WD, betas=BETAS)  # same groups rule
    get = source(cfg.vocab_size, batch, seq)
    start, losses = 0.0, []
    for step in range(steps):
        x = torch.from_numpy(get(step))
        out = hf(input_ids=x[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step == 0:
            start = time.perf_counter()
    rate = (steps - 1) * batch * seq / (time.perf_counter() - start)
    return {"tokens_per_s": rate, "loss": losses[0]}


def cpu(args: argparse.Namespace) -> list[tuple]:
    torch.set_num_threads(args.threads)
    cfg = GPTConfig(vocab_size=8192, n_layer=4, n_head=4, d_model=256, max_seq_len=128,
                    norm="layernorm", mlp="gelu", pos="learned", bias=True)  # fmt: skip
    batch, seq = 8, 128
    steps = 6 if args.quick else 21
    best_ours = best_hf = 0.0
    for _ in range(1 if args.quick else args.rounds):
        a = ours(cfg, batch, seq, steps, "cpu", compile=False)
        b = theirs(cfg, batch, seq, steps)
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-4), (a, b)  # same model, same data
        best_ours, best_hf = max(best_ours, a["tokens_per_s"]), max(best_hf, b["tokens_per_s"])
    shape = f"GPT-2 shape L4 d256 V8192, batch {batch}x{seq}, fp32, {args.threads} threads"
    return [
        ("train step tok/s (CPU)", shape, f"{best_ours:,.0f}", f"{best_hf:,.0f}",
         f"{best_ours / best_hf:.2f}x"),
    ]  # fmt: skip


PEER = Path(__file__).resolve().parent / "peers" / "nanogpt"


class OuterLoss(NextToken):
    """The lever row: logits out of the compiled forward, loss computed eagerly in fp32."""

    def __call__(self, model, batch, generator):  # type: ignore[no-untyped-def]
        from llmctl.train.objectives import LossOutput, token_loss

        tokens = batch["tokens"]
        total, count = token_loss(model(tokens[:, :-1]), tokens[:, 1:])
        return LossOutput(total, count, tokens=tokens[:, :-1].numel())


def nanogpt(batch: int, seq: int, steps: int) -> dict | None:
    """nanoGPT's model.py trained as its train.py does (compiled, bf16 autocast, fused AdamW,
    clipping), random tokens prepared on the CPU and copied pinned/non-blocking as it does."""
    if not (PEER / "model.py").is_file():
        return None
    sys.path.insert(0, str(PEER))
    import model as ng  # the peer's module

    torch.manual_seed(0)
    conf = ng.GPTConfig(block_size=seq, vocab_size=50304, n_layer=12, n_head=12, n_embd=768,
                        dropout=0.0, bias=True)  # fmt: skip
    m = ng.GPT(conf).cuda()
    opt = m.configure_optimizers(WD, LR, BETAS, "cuda")
    cm = torch.compile(m)
    get = source(50304, batch, seq)
    flops = m.get_num_params() * 6 + 12 * 12 * 768 * seq
    start = 0.0
    for step in range(steps):
        xy = torch.from_numpy(get(step)).pin_memory().cuda(non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = cm(xy[:, :-1].contiguous(), xy[:, 1:].contiguous())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step == 1:  # steps 0-1 compile and warm up, as ours excludes its first
            torch.cuda.synchronize()
            start = time.perf_counter()
    torch.cuda.synchronize()
    rate = (steps - 2) * batch * seq / (time.perf_counter() - start)
    peak = peak_flops(torch.device("cuda"))
    return {"tokens_per_s": rate, "mfu": rate * flops / peak if peak else None}


def gpu(args: argparse.Namespace) -> list[tuple]:
    import contextlib
    import io

    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    cfg = preset("gpt2-124m", vocab_size=50304)
    seq = 1024
    rows = []
    for batch in args.batches:
        r = ours(cfg, batch, seq, args.steps, "cuda", compile=True)
        with contextlib.redirect_stdout(io.StringIO()):  # the peer prints its optimizer setup
            p = nanogpt(batch, seq, args.steps)
        torch.cuda.empty_cache()
        peer = "-" if p is None else f"{p['tokens_per_s']:,.0f} (MFU {p['mfu']:.1%})"
        ratio = "-" if p is None else f"{r['tokens_per_s'] / p['tokens_per_s']:.2f}x"
        rows.append((f"gpt2-124m train tok/s ({name})", f"B={batch} T={seq}, bf16, compile",
                     f"{r['tokens_per_s']:,.0f} (MFU {r['mfu']:.1%})", peer, ratio))  # fmt: skip
        print(rows[-1], flush=True)  # a long GPU run keeps what it measured so far
    if args.levers:
        from llmctl.model import gpt

        batch = args.batches[0]
        r = ours(cfg, batch, seq, args.steps, "cuda", compile=True, objective=OuterLoss())
        rows.append((f"lever: loss outside the compiled forward ({name})", f"B={batch}",
                     f"{r['tokens_per_s']:,.0f} (MFU {r['mfu']:.1%})", "-", "-"))  # fmt: skip
        fused = gpt.Fused.forward
        gpt.Fused.forward = lambda self, x, linears: [m(x) for m in linears]  # type: ignore[method-assign]
        try:
            r = ours(cfg, batch, seq, args.steps, "cuda", compile=True)
        finally:
            gpt.Fused.forward = fused  # type: ignore[method-assign]
        rows.append((f"lever: q/k/v as three GEMMs, not one ({name})", f"B={batch}",
                     f"{r['tokens_per_s']:,.0f} (MFU {r['mfu']:.1%})", "-", "-"))  # fmt: skip
        order = list(gpt.ATTENTION_ORDER)
        gpt.ATTENTION_ORDER[:] = order[1:]  # PyTorch's default choice: FlashAttention-2
        try:
            r = ours(cfg, batch, seq, args.steps, "cuda", compile=True)
        finally:
            gpt.ATTENTION_ORDER[:] = order
        rows.append((f"lever: FlashAttention-2 instead of cuDNN attention ({name})", f"B={batch}",
                     f"{r['tokens_per_s']:,.0f} (MFU {r['mfu']:.1%})", "-", "-"))  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="few steps, one round")
    p.add_argument("--markdown", action="store_true", help="print rows for docs/benchmarks.md")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=60, help="GPU steps per run")
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32], help="GPU batch sizes")
    p.add_argument("--levers", action="store_true", help="GPU: also the lever rows")
    p.add_argument("--rounds", type=int, default=3, help="CPU: alternate rounds, best kept")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = p.parse_args()
    set_quiet(True)
    rows = gpu(args) if args.device == "cuda" else cpu(args)
    head = ("benchmark", "setting", "llmctl", "peer", "ratio")
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        for r in rows:
            print("  ".join(f"{k}: {v}" for k, v in zip(head, r, strict=True)))


if __name__ == "__main__":
    main()
