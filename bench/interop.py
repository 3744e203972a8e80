"""Models in and out on CPU: `llmctl import` / `llmctl export` on a real llama2.c model, then
greedy text and decode speed of llmctl vs transformers on the exported files.

The model is aidreams260K (a real pretrained 0.23M-parameter llama2.c model with its tok512
tokenizer; see ../shared/data/models/aidreams260K/SOURCE.md), or any llama2.c pair given
with --model/--tokenizer. Steps: import llama2c → checkpoint; export hf and gguf (f32, f16,
q8_0, q4_0); greedy decoding from BOS (fp32, batch 1, one thread, --new tokens, no eos stop):
llmctl's `generate` on the checkpoint, transformers' `generate` on the exported hf folder, and
transformers on the exported f32 GGUF (its own GGUF reader, an implementation of llama.cpp's
conventions independent of ours). Tokens of every side are compared. llama.cpp itself is not
run here: it has no wheel for this machine and building it takes longer than a bench should.

    .venv/bin/python bench/interop.py [--markdown] [--new 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.model.io import load_model
from llmctl.model.sample import GenerationParams, Stops, generate

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "aidreams260K"


def cli(*args: object) -> float:
    t0 = time.perf_counter()
    r = CliRunner().invoke(app, [str(a) for a in args] + ["-q"])
    if r.exit_code != 0:
        sys.exit(f"llmctl {args[0]} failed: {r.output}")
    return time.perf_counter() - t0


def best(fn, repeats: int) -> tuple[float, list[int]]:  # type: ignore[no-untyped-def]
    out = fn()  # warm-up
    t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    return t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REAL / "aidreams260K.bin")
    ap.add_argument("--tokenizer", type=Path, default=REAL / "tok512.bin")
    ap.add_argument("--new", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--markdown", action="store_true", help="print rows for docs/benchmarks.md")
    args = ap.parse_args()
    if not args.model.is_file():
        print(f"skipped: {args.model} not found")
        return
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # a 0.23M model gains nothing from more; shared cores lose a lot
    tmp = Path(tempfile.mkdtemp())
    rows: list[tuple[str, str]] = []
    t = cli("import", "llama2c", args.model, args.tokenizer, "--out", tmp / "ckpt", "--force")
    rows.append(("import llama2c", f"{t:.2f} s"))
    for fmt, kind in (("hf", ""), ("gguf", "f32"), ("gguf", "f16"), ("gguf", "q8_0"),
                      ("gguf", "q4_0")):  # fmt: skip
        out = tmp / f"{fmt}-{kind or 'hf'}"
        extra = ["--set", f"gguf.type={kind}"] if kind else []
        t = cli("export", tmp / "ckpt", "--format", fmt, *extra, "--out", out, "--force")
        size = sum(p.stat().st_size for p in out.iterdir() if p.name != "manifest.json")
        rows.append((f"export {fmt} {kind}".strip(), f"{t:.2f} s, {size / 1024:,.0f} KiB"))

    model = load_model(tmp / "ckpt")
    n = args.new
    prompt = [[1]]  # BOS, as `llmctl generate --prompt ""` builds it

    def ours() -> list[int]:
        return generate(model, prompt, GenerationParams(max_new_tokens=n), stops=Stops(n))[0][
            0
        ].tokens

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf-hf").eval()
    gg = transformers.AutoModelForCausalLM.from_pretrained(
        tmp / "gguf-f32", gguf_file="model.gguf", dtype=torch.float32
    ).eval()

    def theirs(m: torch.nn.Module) -> list[int]:
        ids = torch.tensor(prompt)
        with torch.inference_mode():
            out = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0)  # fmt: skip
        return out[0, 1:].tolist()

    t_ours, a = best(ours, args.repeats)
    t_hf, b = best(lambda: theirs(hf), args.repeats)
    t_gg, c = best(lambda: theirs(gg), args.repeats)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp / "ckpt" / "tokenizer.json"))
    text = tok.decode([1, *a])
    speed = [
        ("llmctl generate (checkpoint)", n / t_ours, a == a),
        ("transformers (exported hf)", n / t_hf, b == a),
        ("transformers (exported gguf f32)", n / t_gg, c == a),
    ]
    if args.markdown:
        print("| step | result |\n|---|---|")
        for k, v in rows:
            print(f"| {k} | {v} |")
        print("\n| greedy from BOS, fp32, batch 1 | tok/s | vs llmctl | same tokens |")
        print("|---|---|---|---|")
        for name, tps, same in speed:
            print(f"| {name} | {tps:,.1f} | {tps / speed[0][1]:.2f}× | {'yes' if same else 'no'} |")
        print(f"\ngreedy text: `{text[:120]}…`")
    else:
        for k, v in rows:
            print(f"{k:<20} {v}")
        for name, tps, same in speed:
            print(f"{name:<34} {tps:8,.1f} tok/s  same tokens: {same}")
        print(repr(text[:200]))


if __name__ == "__main__":
    main()
