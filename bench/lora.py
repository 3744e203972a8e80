"""LoRA against full finetuning, and against PEFT: parameters, peak memory, step time, file size.

For the `small` preset and the GPT-2 124M shape (CPU, fp32, random tokens, the same batch on
every side), each side trains a few steps in a fresh process:
- `full`: every parameter trains, through `llmctl.train.loop.train` (the real loop);
- `lora`: rank 8, alpha 16, dropout 0.05 on q/k/v/o (`apply_lora`), the base frozen, same loop;
- `peft-full` / `peft-lora`: the peer, transformers' model built from the same weights by
  `model/hf.py` (GPT2LMHeadModel / LlamaForCausalLM), trained by a plain PyTorch loop with the
  same AdamW groups — fully, or with *our adapter* loaded by `peft.PeftModel.from_pretrained`
  (`is_trainable=True`). On the Llama layout (`small`) both LoRA sides train the same
  parameters; on GPT-2 PEFT sees our q/k/v adapters as one rank-3r adapter on the fused
  `c_attn`, whose zero off-diagonal blocks of B train too (more trainable parameters).
Peak memory is the process's peak RSS (VmHWM) after a few steps, less that of an idle process
that imported the same libraries (`idle`, `peft-idle`); the peak is reset (clear_refs) once
the model is built, so building it (PEFT's side builds ours first, then converts) is not
counted. Step time is the median over the steps after the first. Adapter and checkpoint sizes
are the files `save_adapter` and `save_checkpoint` write.

    .venv/bin/python bench/lora.py [--quick] [--markdown] [--shapes small,gpt2-124m]
"""

from __future__ import annotations

import sys
from pathlib import Path

# On the GPU machine the package is not installed: import it from the checkout.
sys.path.append(str(Path(__file__).resolve().parent.parent / "src"))

import argparse
import contextlib
import gc
import itertools
import json
import os
import statistics
import subprocess
import tempfile
import time

import numpy as np
import torch

RANK, ALPHA, DROPOUT, TARGETS = 8, 16.0, 0.05, "attn"
LR, WD = 1e-4, 0.0
SHAPES = {  # name: (preset, vocab, batch, seq)
    "small": ("small", 8192, 2, 256),
    "gpt2-124m": ("gpt2-124m", 50257, 2, 256),
}


def vm_hwm() -> int:
    """Peak resident set size of this process, bytes (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def source(vocab: int, batch: int, seq: int):
    def get(i: int) -> np.ndarray:  # the same batches on every side
        return np.random.default_rng([7, i]).integers(0, vocab, (batch, seq + 1))

    return get


class _Done(Exception):
    pass


def model_config(shape: str):
    from llmctl.model.gpt import preset

    name, vocab, _, _ = SHAPES[shape]
    return preset(name, vocab_size=vocab)


def side_ours(shape: str, lora: bool, steps: int) -> dict:
    from llmctl.model.gpt import GPT
    from llmctl.model.lora import apply_lora, trainable_params
    from llmctl.train.batches import StepBatches
    from llmctl.train.loop import Writer, train
    from llmctl.train.objectives import NextToken
    from llmctl.train.settings import TrainSettings

    _, vocab, batch, seq = SHAPES[shape]
    torch.manual_seed(0)
    model = GPT(model_config(shape))
    if lora:
        apply_lora(model, TARGETS, RANK, ALPHA, DROPOUT)
    trainable, total = trainable_params(model)
    reset = reset_peak()
    stamps: list[float] = []
    peak = [0]

    class Timed(NextToken):
        def __call__(self, model, batch, gen):  # type: ignore[no-untyped-def]
            stamps.append(time.perf_counter())
            if len(stamps) == steps + 1:  # steps done: forward, backward and update of each
                peak[0] = vm_hwm()
                raise _Done
            return super().__call__(model, batch, gen)

    cfg = TrainSettings(steps=steps + 1, lr=LR, warmup=0, weight_decay=WD, save_every=0,
                        eval_every=0, log_every=1000, device="cpu")  # fmt: skip
    with tempfile.TemporaryDirectory() as d, contextlib.suppress(_Done):
        train(model, StepBatches(source(vocab, batch, seq)), Timed(), cfg, Writer(d, {}))
    return {"peak": peak[0], "step_s": _median_step(stamps), "trainable": trainable,
            "total": total, "reset": reset}  # fmt: skip


def side_peer(shape: str, lora: bool, steps: int) -> dict:
    from peft import PeftModel

    from llmctl.model.adapter import save_adapter
    from llmctl.model.gpt import GPT
    from llmctl.model.hf import to_hf_gpt2, to_hf_llama
    from llmctl.model.lora import apply_lora
    from llmctl.train.optim import build_optimizer

    _, vocab, batch, seq = SHAPES[shape]
    torch.manual_seed(0)
    base = GPT(model_config(shape))
    hf = (to_hf_gpt2 if base.config.pos == "learned" else to_hf_llama)(base).train()
    with tempfile.TemporaryDirectory() as d:
        if lora:
            apply_lora(base, TARGETS, RANK, ALPHA, DROPOUT)
            save_adapter(d, base, base_digest="bench", base_path="bench", dropout=DROPOUT)
        del base
        net = PeftModel.from_pretrained(hf, d, is_trainable=True).train() if lora else hf
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())
    reset = reset_peak()
    opt = build_optimizer(net, lr=LR, weight_decay=WD)
    params = [p for p in net.parameters() if p.requires_grad]
    get = source(vocab, batch, seq)
    stamps = []
    for step in range(steps):  # the peer's own loop: the same work as ours per step
        stamps.append(time.perf_counter())
        x = torch.from_numpy(get(step))
        logits = net(input_ids=x[:, :-1]).logits
        loss = (
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, vocab).float(), x[:, 1:].reshape(-1), reduction="sum"
            )
            / x[:, 1:].numel()
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    stamps.append(time.perf_counter())
    return {"peak": vm_hwm(), "step_s": _median_step(stamps), "trainable": trainable,
            "total": total, "reset": reset}  # fmt: skip


def side_idle(peer: bool) -> dict:
    from llmctl.train import loop  # noqa: F401  (what the training sides import)

    if peer:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    return {"peak": vm_hwm()}


def _median_step(stamps: list[float]) -> float:
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return statistics.median(gaps[1:] if len(gaps) > 1 else gaps)  # the first is warm-up


def sizes(shape: str) -> dict:
    """Files as written: the adapter at rank 8 on q/k/v/o, and the checkpoint."""
    from llmctl.model.adapter import save_adapter
    from llmctl.model.gpt import GPT
    from llmctl.model.io import save_checkpoint
    from llmctl.model.lora import apply_lora

    torch.manual_seed(0)
    model = GPT(model_config(shape))
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d) / "ckpt", model)
        ckpt = (Path(d) / "ckpt" / "model.safetensors").stat().st_size
        apply_lora(model, TARGETS, RANK, ALPHA, DROPOUT)
        save_adapter(Path(d) / "a", model, base_digest="bench", base_path="bench")
        adapter = (Path(d) / "a" / "adapter_model.safetensors").stat().st_size
    return {"ckpt": ckpt, "adapter": adapter}


def run_side(side: str, shape: str, steps: int, threads: int) -> dict:
    """One side in a fresh process (its peak RSS is its own)."""
    cmd = [sys.executable, __file__, "--side", side, "--shapes", shape, "--steps", str(steps),
           "--threads", str(threads)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"side {side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the small preset only, 3 steps")
    p.add_argument("--markdown", action="store_true", help="print rows for docs/benchmarks.md")
    p.add_argument("--shapes", default="small,gpt2-124m")
    p.add_argument("--steps", type=int, default=3, help="training steps per side (first = warm-up)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--side", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from llmctl.runtime import set_quiet

    set_quiet(True)
    if args.side:  # a child process: one side, one JSON line
        shape = args.shapes
        r = {
            "idle": lambda: side_idle(False),
            "peft-idle": lambda: side_idle(True),
            "full": lambda: side_ours(shape, False, args.steps),
            "lora": lambda: side_ours(shape, True, args.steps),
            "peft-full": lambda: side_peer(shape, False, args.steps),
            "peft-lora": lambda: side_peer(shape, True, args.steps),
        }[args.side]()
        print(json.dumps(r))
        return
    shapes = ["small"] if args.quick else args.shapes.split(",")
    steps = 3 if args.quick else args.steps
    idle = run_side("idle", shapes[0], steps, args.threads)["peak"]
    peer_idle = run_side("peft-idle", shapes[0], steps, args.threads)["peak"]
    rows = []
    for shape in shapes:
        r = {s: run_side(s, shape, steps, args.threads)
             for s in ("full", "lora", "peft-full", "peft-lora")}  # fmt: skip
        f = sizes(shape)
        _, _, batch, seq = SHAPES[shape]
        mem = {s: r[s]["peak"] - (peer_idle if s.startswith("peft") else idle) for s in r}
        share = r["lora"]["trainable"] / r["lora"]["total"]
        setting = f"{shape}, batch {batch}×{seq}, fp32, {args.threads} threads"
        rows += [
            (f"{shape}: trainable params, rank 8 on q/k/v/o", setting,
             f"{r['lora']['trainable']:,} of {r['lora']['total']:,} ({share:.2%})",
             f"{r['peft-lora']['trainable']:,}", "target ≤ 1.5%"),
            (f"{shape}: peak RSS over idle, full finetune", setting, mb(mem["full"]),
             mb(mem["peft-full"]), f"{mem['full'] / mem['peft-full']:.2f}×"),
            (f"{shape}: peak RSS over idle, LoRA", setting, mb(mem["lora"]),
             mb(mem["peft-lora"]), f"{mem['lora'] / mem['peft-lora']:.2f}×"),
            (f"{shape}: LoRA / full peak RSS", setting,
             f"{mem['lora'] / mem['full']:.2f}×", f"{mem['peft-lora'] / mem['peft-full']:.2f}×",
             "target ≤ 0.6× (GPT-2 124M)"),
            (f"{shape}: step time, full finetune", setting, f"{r['full']['step_s']:.3f} s",
             f"{r['peft-full']['step_s']:.3f} s",
             f"{r['peft-full']['step_s'] / r['full']['step_s']:.2f}× faster"),
            (f"{shape}: step time, LoRA", setting, f"{r['lora']['step_s']:.3f} s",
             f"{r['peft-lora']['step_s']:.3f} s",
             f"{r['peft-lora']['step_s'] / r['lora']['step_s']:.2f}× faster"),
            (f"{shape}: adapter / checkpoint file", "safetensors, fp32",
             f"{mb(f['adapter'])} / {mb(f['ckpt'])} = {f['adapter'] / f['ckpt']:.2%}", "-",
             "target ≤ 2%"),
        ]  # fmt: skip
        if not all(r[s]["reset"] for s in r):
            print("warning: could not reset the peak RSS; model building is included")
    head = ("benchmark", "setting", "llmctl", "peer (transformers + PEFT)", "ratio / target")
    if args.markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        for row in rows:
            print("  ".join(f"{k}: {v}" for k, v in zip(head, row, strict=True)))


if __name__ == "__main__":
    main()
