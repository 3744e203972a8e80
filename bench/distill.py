"""Distillation on the demo corpus: a `small` teacher, `mini` students (about a quarter of its
parameters) trained the same steps, on the same data, from the same initialization.

Builds (or reuses, under `--work`) the demo tokens from `recipes/data` with the `small`
recipe's clean/dedup/tokenize settings, pretrains the teacher, then three students:
- `data alone`: `llmctl pretrain --preset mini` (next-token cross-entropy);
- `logit`: `llmctl distill --kind logit --student-preset mini` (forward KL, alpha, T);
- `feature`: `llmctl distill --kind feature` (the logit term + cosine distance of hidden
  states, every student layer matched to an evenly spaced teacher layer through a learned
  projection).
`distill --student-preset` seeds and builds the student exactly as `pretrain` does, and both
read the same batches (same seed, batch size and length), so the three differ in the loss only.
Each model is scored by `llmctl eval` on the val split (loss in nats per token, bits per
byte), and batch-1 greedy decoding speed (fp32, 1 thread, KV cache, 128 new tokens, best of
5 interleaved rounds) gives the teacher/student speed ratio.

    .venv/bin/python bench/distill.py [--teacher-steps 400] [--steps 300] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LLMCTL = str(Path(sys.executable).parent / "llmctl")
CORPUS = [ROOT / "recipes" / "data" / d for d in ("web", "books", "wiki")]
CFG = ROOT / "recipes" / "small"


def sh(*args: str) -> None:
    t0 = time.perf_counter()
    subprocess.run([LLMCTL, *args, "--quiet"], check=True)
    out = args[args.index("--out") + 1]
    print(f"  {args[0]} -> {out}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)


def build(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The tokens, the teacher and the three students (each skipped when already built)."""
    p = {n: work / n for n in ("clean", "dedup", "tokens", "teacher", "data-alone", "logit",
                               "feature")}  # fmt: skip
    if not (p["clean"] / "manifest.json").exists():
        sh(
            "clean",
            *map(str, CORPUS),
            "--out",
            str(p["clean"]),
            "--config",
            str(CFG / "clean.toml"),
        )
    if not (p["dedup"] / "manifest.json").exists():
        sh("dedup", str(p["clean"]), "--out", str(p["dedup"]), "--config", str(CFG / "dedup.toml"))
    if not (p["tokens"] / "manifest.json").exists():
        sh("tokenize", str(p["dedup"]), "--out", str(p["tokens"]), "--config",
           str(CFG / "tokenize.toml"))  # fmt: skip
    common = ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--device",
              "cpu", "--seed", "0", "--set", f"warmup={args.warmup}", "--set", "eval_every=0",
              "--set", "save_every=0", "--lr", str(args.lr)]  # fmt: skip
    if not (p["teacher"] / "manifest.json").exists():
        sh("pretrain", str(p["tokens"]), "--preset", "small", "--steps", str(args.teacher_steps),
           *common, "--out", str(p["teacher"]))  # fmt: skip
    student = ["--steps", str(args.steps), *common]
    if not (p["data-alone"] / "manifest.json").exists():
        sh("pretrain", str(p["tokens"]), "--preset", "mini", *student, "--out",
           str(p["data-alone"]))  # fmt: skip
    kd = ["--student-preset", "mini", "--set", f"alpha={args.alpha}", "--set",
          f"temperature={args.temperature}"]  # fmt: skip
    for kind in ("logit", "feature"):
        if not (p[kind] / "manifest.json").exists():
            sh("distill", str(p["tokens"]), "--teacher", str(p["teacher"]), "--kind", kind, *kd,
               *student, "--out", str(p[kind]))  # fmt: skip
    return p


def decode_speeds(ckpts: list[Path], new: int = 128, repeats: int = 5) -> list[float]:
    """Batch-1 greedy tokens/s in fp32 on the CPU of each checkpoint: one warm-up call each,
    then `repeats` rounds interleaved (a, b, a, b, ...), so load from other processes hits all
    alike; the best round of each is kept."""
    from llmctl.model.io import load_model
    from llmctl.model.sample import GenerationParams, Stops, generate

    models = [load_model(c) for c in ckpts]
    prompt = [[1, *range(10, 26)]]
    params, stops = GenerationParams(max_new_tokens=new), Stops(new)  # no eos: exactly `new`
    for m in models:
        generate(m, prompt, params, stops=stops, decode_layout=True)
    best = [float("inf")] * len(models)
    for _ in range(repeats):
        for i, m in enumerate(models):
            t0 = time.perf_counter()
            generate(m, prompt, params, stops=stops, decode_layout=True)
            best[i] = min(best[i], time.perf_counter() - t0)
    return [new / b for b in best]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "distill")
    ap.add_argument("--teacher-steps", type=int, default=400)
    ap.add_argument("--steps", type=int, default=300, help="student steps (all three)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--markdown", action="store_true", help="print rows for docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(1)  # a shared, busy machine: spinning threads only lose time
    from llmctl.commands.eval import EvalConfig
    from llmctl.commands.eval import run as evaluate
    from llmctl.runtime import set_quiet

    p = build(args.work, args)
    set_quiet(True)
    rows = []
    teacher_params = json.loads((p["teacher"] / "manifest.json").read_text())["stats"]["params"]
    # the three students share one architecture: the data-alone one stands for all
    teacher_speed, student_speed = decode_speeds([p["teacher"], p["data-alone"]])
    for name in ("teacher", "data-alone", "logit", "feature"):
        e = evaluate(p[name], [p["tokens"]], EvalConfig(seq_len=args.seq_len, device="cpu"))
        stats = json.loads((p[name] / "manifest.json").read_text())["stats"]
        speed = teacher_speed if name == "teacher" else student_speed
        rows.append((name, stats["params"], e["loss"], e["bits_per_byte"], speed,
                     stats.get("train_time_s", 0.0)))  # fmt: skip
    base = rows[1]
    head = ("model", "params", "ratio", "val loss", "bits/byte", "vs data alone", "decode tok/s",
            "speed ×", "train s")  # fmt: skip
    lines = []
    for name, n, loss, bpb, speed, secs in rows:
        gain = "-" if name in ("teacher", "data-alone") else f"{bpb - base[3]:+.4f}"
        lines.append((name, f"{n / 1e6:.2f}M", f"{n / teacher_params:.3f}", f"{loss:.4f}",
                      f"{bpb:.4f}", gain, f"{speed:,.0f}", f"{speed / teacher_speed:.2f}",
                      f"{secs:.0f}"))  # fmt: skip
    if args.markdown:
        print(f"\nteacher `small` {args.teacher_steps} steps; students `mini` {args.steps} steps; "
              f"batch {args.batch_size} × {args.seq_len} tokens, lr {args.lr}, warmup "
              f"{args.warmup}, seed 0; alpha {args.alpha}, T {args.temperature}\n")  # fmt: skip
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for line in lines:
            print("| " + " | ".join(line) + " |")
    else:
        w = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
        for line in (head, *lines):
            print("  ".join(str(x).rjust(k) for x, k in zip(line, w, strict=True)))


if __name__ == "__main__":
    main()
