"""`llmctl align` on the demo model: cached vs uncached reference, and before/after figures.

Runs the real CLI (`python -m llmctl.cli align ...`) on a checkpoint (default: the `small`
demo model after SFT) and the bundled preference task (`recipes/data/pairs/`):

1. DPO with the reference log-probs cached (computed once) and the same run with
   `reference_cache=false` (the frozen reference runs every micro-batch, as TRL without
   `precompute_ref_log_probs`): time per epoch side by side, with the ratio;
2. the before/after figures of each method's run (held-out preference accuracy base → after,
   reward accuracy, margin, chosen/rejected log-probs, KL to the reference), a reward model's
   held-out pairwise accuracy, and `eval RM PAIRS`;
3. DPO on the hh-rlhf pairs end to end.

Prints one table per part and writes every manifest's stats as JSON (`--json`).

Example:
    python bench/align.py --checkpoint /work/demo-out/sft --out bench/out/align --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "recipes" / "data" / "pairs" / "continuation.jsonl"
HH = ROOT / "recipes" / "data" / "pairs" / "hh_rlhf_harmless_300.jsonl.gz"


SEEN: dict[str, dict] = {}
JSON_OUT: Path | None = None


def llmctl(*args: object) -> tuple[str, float]:
    cmd = [sys.executable, "-m", "llmctl.cli", *map(str, args)]
    print("$ llmctl " + " ".join(map(str, args)), flush=True)
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "110"})
    took = time.perf_counter() - t
    print(r.stderr[-3000:] + r.stdout[-3000:], flush=True)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode})")
    return r.stdout, took


def stats(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["stats"]


def align(ckpt: Path, data: Path, out: Path, method: str, common: list[str], *extra: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    _, took = llmctl("align", ckpt, data, "--out", out, "--method", method, *common, *extra)
    s = stats(out)
    s["wall_s"] = took
    SEEN[f"{method}:{out.name}"] = s
    if JSON_OUT is not None:  # written after every run: a cut-short bench keeps what it did
        JSON_OUT.write_text(json.dumps(SEEN, indent=2, default=str))
    return s


def main() -> None:
    global JSON_OUT, PAIRS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=Path("/work/demo-out/sft"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "align")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--reward-lr", type=float, default=1e-4)
    ap.add_argument("--pairs", type=Path, default=None, help="the preference task")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip-cache-bench", action="store_true")
    ap.add_argument("--skip-hh", action="store_true")
    ap.add_argument("--methods", default="dpo,ipo,simpo,orpo,kto,reward")
    args = ap.parse_args()
    JSON_OUT, PAIRS = args.json, args.pairs or PAIRS
    args.out.mkdir(parents=True, exist_ok=True)
    common = ["--device", args.device, "--batch-size", args.batch_size, "--lr", args.lr,
              "--set", "val_fraction=0.15", "--set", "eval_every=25", "-q"]  # fmt: skip
    results: dict[str, dict] = {}

    # 1. cached vs uncached reference: one epoch each
    one = [*common, "--epochs", 1]
    if not args.skip_cache_bench:
        cache_bench(args, one, results)

    # 2. every method, `epochs` passes
    full = [*common, "--epochs", args.epochs]
    for method in args.methods.split(","):
        extra = ["--set", "beta=2.0"] if method == "simpo" else []
        if method == "reward":
            extra = ["--lr", str(args.reward_lr)]
        results[method] = align(args.checkpoint, PAIRS, args.out / method, method, full, *extra)
    report(args, results)

    # 3. hh-rlhf end to end
    if not args.skip_hh:
        hh = align(args.checkpoint, HH, args.out / "hh-dpo", "dpo",
                   [*common, "--epochs", 1, "--set", "max_prompt_tokens=128"])  # fmt: skip
        results["hh-dpo"] = hh
        p = hh["preference"]
        print(
            f"\nhh-rlhf DPO: {p['pairs']} pairs ({p['cut']} cut, {p['rejected']} rejected), "
            f"accuracy {p['base_accuracy']:.3f} → {p['accuracy']:.3f}, KL {p['kl']:.4f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


def cache_bench(args: argparse.Namespace, one: list, results: dict) -> None:
    cached = align(args.checkpoint, PAIRS, args.out / "dpo-cached", "dpo", one)
    uncached = align(args.checkpoint, PAIRS, args.out / "dpo-uncached", "dpo", one,
                     "--set", "reference_cache=false")  # fmt: skip
    results |= {"dpo-cached-1ep": cached, "dpo-uncached-1ep": uncached}
    c_epoch = cached["train_time_s"] / cached["epochs"]
    u_epoch = uncached["train_time_s"] / uncached["epochs"]
    print("\n## reference: cached vs uncached (DPO, one epoch)")
    print("| | cached | uncached | ratio |\n|---|---|---|---|")
    ratio = u_epoch / c_epoch
    print(f"| training time per epoch (s) | {c_epoch:.2f} | {u_epoch:.2f} | {ratio:.2f}x |")
    print(f"| reference pass, once (s) | {cached['reference_s']:.2f} | - | |")
    print(f"| wall time of the command (s) | {cached['wall_s']:.1f} | {uncached['wall_s']:.1f} | "
          f"{uncached['wall_s'] / cached['wall_s']:.2f}x |")  # fmt: skip
    same = cached["preference"]["accuracy"] == uncached["preference"]["accuracy"]
    print(
        f"| held-out accuracy after | {cached['preference']['accuracy']:.3f} | "
        f"{uncached['preference']['accuracy']:.3f} | {'same' if same else 'differs'} |"
    )


def report(args: argparse.Namespace, results: dict) -> None:
    if "reward" in results:
        out, _ = llmctl("eval", args.out / "reward", PAIRS, "--device", args.device, "--json")
        results["eval-rm"] = json.loads(out[out.index("{") :])
    print("\n## before → after (held-out pairs of recipes/data/pairs/continuation.jsonl)")
    print(
        "| method | accuracy base → after | reward acc | margin | chosen logp | "
        "rejected logp | KL (nats/token) | steps | train s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for m in args.methods.split(","):
        s, p = results[m], results[m]["preference"]

        def f(x: object, fmt: str = ".3f") -> str:
            return "-" if x is None else format(x, fmt)

        print(f"| {m} | {f(p['base_accuracy'])} → {f(p['accuracy'])} | "
              f"{f(p['reward_accuracy'])} | {f(p['margin'])} | "
              f"{f(p['base_chosen_logp'], '.1f')} → {f(p['chosen_logp'], '.1f')} | "
              f"{f(p['base_rejected_logp'], '.1f')} → {f(p['rejected_logp'], '.1f')} | "
              f"{f(p['kl'], '.4f')} | {s['steps']} | {s['train_time_s']:.1f} |")  # fmt: skip
    if "eval-rm" in results:
        e = results["eval-rm"]
        print(
            f"\neval RM PAIRS (all {e['pairs']} pairs, train + held out): "
            f"accuracy {e['accuracy']:.4f}, margin {e['margin']:.3f}"
        )


if __name__ == "__main__":
    main()
