"""Online RL and RLAIF on the small demo model: does the reward go up in a fixed budget?

Runs GRPO and PPO (`train.online_run.run_online`) on the chat model of `make demo`
(`out/sft`) against a builtin reward (default `builtin:length:8`: answers of about 8 tokens,
which the SFT model, answering at length, must learn to stop), with the bundled prompts
(`recipes/data/prompts/prompts.jsonl`), and prints per method the held-out reward of greedy
answers before and after, the training reward of the first and last log windows, the KL to the
reference and the wall time. `--rlaif JUDGE` also generates RLAIF pairs (k = 4) for 32 prompts
with that judge and prints how many pairs and ties.

`--rlaif-rm RM` measures RLAIF with a reward model as judge end to end: the mean RM score of
the policy's greedy answers to held-out prompts (those `split_held_out` holds out) before and
after `llmctl align CHECKPOINT PROMPTS --method rlaif --judge RM` (DPO on the judged pairs of
the other prompts, `--rlaif-steps` steps).

Usage: .venv/bin/python bench/online_rl.py [--checkpoint out/sft] [--steps 40] [--markdown]
           [--reward builtin:length:8] [--methods grpo ppo] [--rlaif judge:out/model]
           [--rlaif-rm out/rm --rlaif-prompts 32 --rlaif-steps 10 --held-out 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "recipes" / "data" / "prompts" / "prompts.jsonl"


def run(method: str, args: argparse.Namespace, out: Path) -> dict:
    from llmctl.artifacts import open_artifact
    from llmctl.train.online import OnlineConfig
    from llmctl.train.online_run import run_online

    cfg = OnlineConfig(steps=args.steps, batch_size=4, group_size=4, max_new_tokens=24,
                       eval_prompts=16, device=args.device, lr=args.lr, eval_every=10,
                       save_every=10, log_every=5)  # fmt: skip
    t = time.time()
    run_online(Path(args.checkpoint), [PROMPTS], out / method, method, args.reward, cfg)
    wall = time.time() - t
    rl = open_artifact(out / method, "checkpoint").stats["rl"]
    rows = [json.loads(x) for x in (out / method / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "reward" in r]
    return {"method": method, **rl, "first": train[0]["reward"], "last": train[-1]["reward"],
            "len_first": train[0]["response_len"], "len_last": train[-1]["response_len"],
            "wall_s": wall}  # fmt: skip


def rm_rlaif(args: argparse.Namespace, tmp: Path) -> dict:
    """Mean RM reward of greedy answers to held-out prompts before/after RLAIF (RM judge)."""
    from llmctl.commands.align import RlaifConfig, run_rlaif
    from llmctl.data.prompts import load_prompts
    from llmctl.model.sample import Stops
    from llmctl.tokenizer import chat_template_of, decode, load_specials, load_tokenizer
    from llmctl.train.online_run import greedy_reward, load_policy, split_held_out
    from llmctl.train.rewards import load_reward
    from llmctl.train.rlaif import PairSettings

    ck = Path(args.checkpoint)
    tok, sp = load_tokenizer(ck), load_specials(ck)
    lines = PROMPTS.read_text().splitlines(keepends=True)
    texts = [json.dumps(json.loads(x), sort_keys=True) for x in lines]
    keep, held = split_held_out(texts, args.held_out)
    train_file, held_file = tmp / "train.jsonl", tmp / "held.jsonl"
    train_file.write_text("".join(lines[i] for i in keep[: args.rlaif_prompts]))
    held_file.write_text("".join(lines[i] for i in held))
    new = args.rlaif_new_tokens
    got = load_prompts([held_file], tok, template=chat_template_of(ck), chat=None,
                       max_tokens=256 - new, strict=False)  # fmt: skip
    rm = load_reward(args.rlaif_rm, tokenizer_dir=ck, device=args.device if args.device != "auto"
                     else "cpu", pad_id=sp.pad_or_eos)  # fmt: skip
    stops = Stops(new, eos_ids=frozenset({sp.eos}), stop_ids=frozenset({sp.end_of_turn}))

    def mean_reward(path: Path) -> float:
        policy = load_policy(path, "cpu").eval()
        return greedy_reward(policy, rm, got.ids, got.texts, stops=stops, pad_id=sp.pad_or_eos,
                             max_new_tokens=new,
                             decode=lambda b: decode(tok, b, skip_special_tokens=True))  # fmt: skip

    before = mean_reward(ck)
    cfg = RlaifConfig(steps=args.rlaif_steps, batch_size=4, lr=args.rlaif_lr, warmup=2,
                      eval_every=0, save_every=0, kl_pairs=0, device="cpu",
                      rlaif=PairSettings(k=4, max_new_tokens=new, batch=8))  # fmt: skip
    t = time.time()
    stats = run_rlaif(ck, [train_file], tmp / "rlaif", args.rlaif_rm, cfg, force=True)
    wall = time.time() - t
    after = mean_reward(tmp / "rlaif")
    return {
        "before": before,
        "after": after,
        "held_out": len(got.ids),
        "pairs": stats["rlaif"]["pairs"],
        "ties": stats["rlaif"]["ties"],
        "wall_s": wall,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=str(ROOT / "out" / "sft"))
    p.add_argument("--reward", default="builtin:length:8")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", nargs="*", default=["grpo", "ppo"])
    p.add_argument("--rlaif", default="")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--rlaif-rm", default="", help="a reward model: RLAIF with it as judge")
    p.add_argument("--rlaif-prompts", type=int, default=32)
    p.add_argument("--rlaif-steps", type=int, default=10)
    p.add_argument("--rlaif-lr", type=float, default=5e-5)
    p.add_argument("--rlaif-new-tokens", type=int, default=24)
    p.add_argument("--held-out", type=int, default=8)
    args = p.parse_args()
    if args.rlaif_rm:
        with tempfile.TemporaryDirectory() as tmp:
            r = rm_rlaif(args, Path(tmp))
        print(f"RLAIF, judge {args.rlaif_rm}: held-out RM reward {r['before']:.4f} → "
              f"{r['after']:.4f} ({r['held_out']} prompts, greedy); {r['pairs']} pairs, "
              f"{r['ties']} ties from {args.rlaif_prompts} prompts × 4; {args.rlaif_steps} DPO "
              f"steps, lr {args.rlaif_lr}; {r['wall_s']:.0f} s")  # fmt: skip
        if not args.methods:
            return
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(m, args, Path(tmp)) for m in args.methods]
    head = ("method | held-out reward before → after | train reward first → last window | "
            "response tokens | KL | steps | wall s")  # fmt: skip
    print(f"reward {args.reward}, {args.checkpoint}, batch 4 prompts × 4 samples, lr {args.lr}")
    print(("| " + head + " |\n|" + "---|" * 7) if args.markdown else head)
    for r in results:
        cells = [r["method"], f"{r['reward_before']:.3f} → {r['reward_after']:.3f}",
                 f"{r['first']:.3f} → {r['last']:.3f}",
                 f"{r['len_first']:.1f} → {r['len_last']:.1f}", f"{r['kl']:.3f}",
                 str(r["steps"]), f"{r['wall_s']:.0f}"]  # fmt: skip
        print(("| " + " | ".join(cells) + " |") if args.markdown else "  ".join(cells))
    if args.rlaif:
        from llmctl.train.rlaif import PairSettings, make_pairs

        with tempfile.TemporaryDirectory() as tmp:
            few = Path(tmp) / "prompts.jsonl"
            few.write_text("".join(PROMPTS.read_text().splitlines(keepends=True)[:32]))
            t = time.time()
            pairs, stats = make_pairs(Path(args.checkpoint), [few], args.rlaif,
                                      PairSettings(k=4, max_new_tokens=32))  # fmt: skip
        margin = sum(x["chosen_score"] - x["rejected_score"] for x in pairs) / max(1, len(pairs))
        print(f"RLAIF ({args.rlaif}): {stats['pairs']} pairs, {stats['ties']} ties from "
              f"{stats['prompts']} prompts × 4 answers, mean score margin {margin:.3f}, "
              f"{time.time() - t:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
