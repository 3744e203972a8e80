"""Quantization: size, quality and CPU decode speed per method, from one run.

Part 1, a trained checkpoint (the `small` demo model): `llmctl quantize` (the real command) with
every method, and each report's figures side by side: checkpoint file size and its ratio to
fp32, val loss and bits per byte on the tokens artifact's val split, and greedy batch-1 decode
tokens/s on the CPU (in the dtype `generate` uses there). QAT int4 is compared with two
baselines on the same data budget: PTQ int4 of the base, and the base fine-tuned in float for
the same steps on the same batches and then PTQ int4 (so the gain is not just more training).

Part 2, the GPT-2-124M shape (random weights; batch-1 decoding streams every weight byte per
token, so bytes per weight decide the speed): decode tokens/s for fp32, bf16 and int8
weight-only (embedding and tied head int8 too), interleaved repeats, best kept, in one run.

    .venv/bin/python bench/quantize.py --checkpoint out/model --tokens out/tokens [--markdown]
    .venv/bin/python bench/quantize.py --skip-checkpoint      # part 2 only
    .venv/bin/python bench/quantize.py --rows --threads 1      # part 3 only

Part 3, one quantized Linear at 1 to 2,048 rows (decoding is one row, eval and prefill are
thousands): the layer as it dispatches (the CPU integer kernel at one row, dequantize + float
GEMM beyond) against the integer kernel forced at every row count, and the float Linear.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl.commands.quantize import QuantizeConfig
from llmctl.commands.quantize import run as quantize_run
from llmctl.data.heldout import token_ids
from llmctl.model import quant as Q
from llmctl.model.gpt import GPT, preset
from llmctl.runtime import set_quiet
from llmctl.scoring import decode_speed, loss_and_bits_per_byte

METHODS: dict[str, dict[str, Any]] = {
    "int8": {"method": "int8"},
    "int4 g64": {"method": "int4"},
    "int4 g64 zero points": {"method": "int4", "zero_point": True},
    "dynamic": {"method": "dynamic"},
    "static (percentile)": {"method": "static", "observer": "percentile"},
    "static (minmax)": {"method": "static", "observer": "minmax"},
    "qat int4": {"method": "qat", "bits": 4},
}


def part1(
    ckpt: Path, tokens: Path, out: Path, qat: dict[str, int], decode: int, eval_tokens: int
) -> list[dict]:
    rows = []
    for name, kw in METHODS.items():
        cfg = QuantizeConfig(eval_tokens=eval_tokens, decode_tokens=decode, **qat, **kw)
        t0 = time.perf_counter()
        dest = out / name.replace(" ", "-")
        stats = quantize_run(ckpt, dest, cfg, calib=tokens, eval_data=tokens, force=True)
        r = stats["report"]
        rows.append({**r, "method": name, "seconds": time.perf_counter() - t0})
    rows.append(float_finetune_then_ptq(ckpt, tokens, out, qat, eval_tokens))
    return rows


def float_finetune_then_ptq(
    ckpt: Path, tokens: Path, out: Path, qat: dict[str, int], eval_tokens: int
) -> dict:
    """The QAT run's loop, data and steps without fake quantization, then PTQ int4."""
    from llmctl.data.tokens import TokenStream
    from llmctl.model.io import load_model
    from llmctl.tokenizer import load_specials, load_tokenizer
    from llmctl.train.batches import StepBatches
    from llmctl.train.loop import Writer, train
    from llmctl.train.objectives import NextToken

    cfg = QuantizeConfig(method="int4", **qat)
    model = load_model(ckpt, device="cuda" if torch.cuda.is_available() else "cpu")
    seq = cfg.seq_len or model.config.max_seq_len
    stream = TokenStream(tokens, "train", cfg.batch_size, seq, cfg.seed)
    work = out / "float-ft"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    train(model, StepBatches(stream.sample), NextToken(), cfg, Writer(work, {"bench": 1}))
    model.cpu().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = load_tokenizer(ckpt)
    ids, _ = token_ids([tokens], ckpt, tok, cfg, "val", eval_tokens)
    special = np.array(sorted(load_specials(ckpt).all), dtype=np.int64)
    ft = loss_and_bits_per_byte(model, ids, tok, seq, special)
    Q.quantize(model, Q.QuantSpec("int4"))
    after = loss_and_bits_per_byte(model, ids, tok, seq, special)
    return {"method": "float fine-tune + PTQ int4", "after": after, "float_ft": ft}


def part2(threads: int, tokens: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    base = GPT(preset("gpt2-124m")).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    int8 = GPT(preset("gpt2-124m")).eval()
    int8.load_state_dict(base.state_dict())
    Q.quantize(int8, Q.QuantSpec("int8"))
    int4 = GPT(preset("gpt2-124m")).eval()
    int4.load_state_dict(base.state_dict())
    Q.quantize(int4, Q.QuantSpec("int4"))
    sides = {
        "fp32": (base, None),
        "bf16": (base, torch.bfloat16),
        "int8 (bf16 activations)": (int8, torch.bfloat16),
        "int8 (fp32 activations)": (int8, None),
        "int4 g64 (bf16 activations)": (int4, torch.bfloat16),
    }
    best = dict.fromkeys(sides, 0.0)
    for _ in range(repeats):  # interleaved: a load spike hits every side alike
        for name, (model, dtype) in sides.items():
            best[name] = max(best[name], decode_speed(model, tokens, dtype))
    return [
        {"model": "gpt2-124m (random)", "weights": name, "threads": threads,
         "tokens/s": best[name], "vs fp32": best[name] / best["fp32"]}
        for name in sides
    ]  # fmt: skip


def part3(repeats: int) -> list[list[str]]:
    """ms per call of a quantized Linear (d 384 -> 1024 and 768 -> 2304), dispatched vs the
    integer kernel forced, and the float Linear, at 1..2,048 rows (fp32 activations)."""

    def ms(f: Any, *args: Any) -> float:
        f(*args)
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            f(*args)
            best = min(best, time.perf_counter() - t)
        return best * 1e3

    def int8_kernel(x: torch.Tensor, q: Q.Int8Linear) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, q.qweight, q.scale) + q.bias

    def int4_kernel(x: torch.Tensor, q: Q.Int4Linear) -> torch.Tensor:
        packed, scales = q._kernel_args(x.dtype)  # type: ignore[misc]
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, q.group, scales) + q.bias

    head = ["layer", "rows", "float ms", "dispatched ms", "kernel forced ms", "forced / dispatched"]
    lines = [head]
    for k, n in ((384, 1024), (768, 2304)):
        torch.manual_seed(0)
        lin = torch.nn.Linear(k, n)
        layers = (("int8", Q.Int8Linear.from_linear(lin), int8_kernel),
                  ("int4 g32", Q.Int4Linear.from_weight(lin.weight.detach(), lin.bias.detach(),
                                                        32, False), int4_kernel))  # fmt: skip
        for rows in (1, 2, 16, 256, 2048):
            x = torch.randn(rows, k)
            with torch.no_grad():
                base = ms(lin, x)
                for name, q, kernel in layers:
                    d, f = ms(q, x), ms(kernel, x, q)
                    lines.append([f"{name} {k}->{n}", str(rows), f"{base:.3f}", f"{d:.3f}",
                                  f"{f:.3f}", f"{f / d:.2f}"])  # fmt: skip
    return lines


def table(rows: list[dict]) -> list[list[str]]:
    out = [["method", "file", "× fp32", "val loss", "bpb", "Δ bpb", "decode tok/s", "× base"]]
    base = rows[0]["before"]
    out.append(["fp32 (base)", f"{base['file_bytes'] / 2**20:.2f} MiB", "1.000",
                f"{base['val_loss']:.4f}", f"{base['bits_per_byte']:.4f}", "-",
                f"{base['decode_tokens_per_s']:,.1f}", "1.00"])  # fmt: skip
    for r in rows:
        a = r["after"]
        if "file_bytes" not in a:  # the float fine-tune baseline
            d = a["bits_per_byte"] / base["bits_per_byte"] - 1
            out.append([r["method"], "-", "-", f"{a['val_loss']:.4f}",
                        f"{a['bits_per_byte']:.4f}", f"{d:+.2%}", "-", "-"])  # fmt: skip
            continue
        out.append([
            r["method"], f"{a['file_bytes'] / 2**20:.2f} MiB", f"{r['size_ratio']:.3f}",
            f"{a['val_loss']:.4f}", f"{a['bits_per_byte']:.4f}", f"{r['bpb_change']:+.2%}",
            f"{a['decode_tokens_per_s']:,.1f}", f"{r['speedup']:.2f}",
        ])  # fmt: skip
    return out


def print_table(lines: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(lines[0]) + " |")
        print("|" + "---|" * len(lines[0]))
        for line in lines[1:]:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="a trained float checkpoint (demo: out/model)")
    ap.add_argument("--tokens", type=Path, help="its tokens artifact (val split, calibration)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/quantize"))
    ap.add_argument("--skip-checkpoint", action="store_true", help="part 2 only")
    ap.add_argument("--qat-steps", type=int, default=200)
    ap.add_argument("--qat-batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=0, help="QAT and eval windows (0: model's)")
    ap.add_argument("--eval-tokens", type=int, default=0, help="val tokens scored (0: all)")
    ap.add_argument("--calib-tokens", type=int, default=32768, help="static calibration tokens")
    ap.add_argument("--skip-gpt2", action="store_true", help="part 1 only")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--markdown", action="store_true", help="print rows for docs/benchmarks.md")
    ap.add_argument("--rows", action="store_true", help="part 3 only: the layer by row count")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    set_quiet(True)
    where = (f"CPU {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")  # fmt: skip
    result: dict[str, Any] = {"where": where}
    if args.rows:
        print(f"<!-- bench/quantize.py part 3: {where} -->")
        print_table(part3(args.repeats), args.markdown)
        return
    if not args.skip_checkpoint:
        if not (args.checkpoint and args.tokens):
            ap.error("--checkpoint and --tokens are needed (or --skip-checkpoint)")
        qat = {"steps": args.qat_steps, "warmup": max(1, args.qat_steps // 10),
               "batch_size": args.qat_batch_size, "seq_len": args.seq_len,
               "calib_tokens": args.calib_tokens}  # fmt: skip
        rows = part1(args.checkpoint, args.tokens, args.out, qat, args.decode_tokens,
                     args.eval_tokens)  # fmt: skip
        result["checkpoint"] = rows
        print(f"<!-- bench/quantize.py part 1: {args.checkpoint}, {where} -->")
        print_table(table(rows), args.markdown)
        print()
    if args.skip_gpt2:
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str))
        return
    speed = part2(torch.get_num_threads(), args.decode_tokens, args.repeats)
    result["gpt2"] = speed
    lines = [["model", "weights", "threads", "decode tok/s (batch 1)", "× fp32"]]
    lines += [[r["model"], r["weights"], str(r["threads"]), f"{r['tokens/s']:,.1f}",
               f"{r['vs fp32']:.2f}"] for r in speed]  # fmt: skip
    print(f"<!-- bench/quantize.py part 2: {where} -->")
    print_table(lines, args.markdown)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
