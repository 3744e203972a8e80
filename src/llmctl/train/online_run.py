"""Online RL end to end: `run_online(checkpoint, prompts, out, method, reward, cfg)` → checkpoint.

The entry point behind `llmctl align --method grpo|ppo --reward SPEC`. It loads the policy
and a frozen copy as the reference, reads the prompts (`data/prompts.py`), holds out
`eval_prompts` of them (chosen by a hash of their text), builds the reward (`train/rewards.py`)
and trains with the one loop through `train_and_publish`: batches are `experience.Rollouts`
(sampled inside each step), the objective `online.GRPO` or `online.PPO`. A probe logs the mean
reward of the policy's greedy answers to the held-out prompts (`eval_reward`) at each
evaluation; the manifest's stats add `"rl": {"reward_before", "reward_after", "kl", "steps",
"method"}` (reward_before: the reference's greedy answers, which are the starting policy's).
PPO's value head lives in `model.aux` and is not saved. Rerunning the same call resumes.

Example:
    run_online(Path("out/sft"), [Path("prompts.jsonl")], Path("out/grpo"), "grpo",
               "builtin:length:8", OnlineConfig(steps=50))
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from torch import nn

from llmctl.artifacts import open_artifact, sha256_file
from llmctl.config import to_dict
from llmctl.errors import UsageError
from llmctl.model.sample import GenerationParams, Stops
from llmctl.runtime import info, summary, warn
from llmctl.train.online import GRPO, PPO, OnlineConfig, attach_value_head
from llmctl.train.rewards import Reward, Samples
from llmctl.train.settings import COSMETIC

METHODS = ("grpo", "ppo")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def load_policy(checkpoint: Path, device: Any) -> nn.Module:
    """The checkpoint as a trainable fp32 causal LM on `device` (UsageError otherwise)."""
    from llmctl.model.io import load_model

    model = load_model(checkpoint).float()
    if getattr(model.config, "head", "lm") != "lm":
        raise UsageError(f"{checkpoint}: a reward model (head='score') cannot be the policy")
    if not getattr(model.config, "causal", True):
        raise UsageError(f"{checkpoint}: a masked-LM (bidirectional) model cannot generate")
    return model.to(device)


def split_held_out(texts: list[str], n: int) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): the `n` prompts whose text hashes lowest are held
    out (stable under reordering), never more than a fifth of them."""
    n = min(n, len(texts) // 5)
    order = sorted(range(len(texts)), key=lambda i: hashlib.sha256(texts[i].encode()).digest())
    held = sorted(order[:n])
    keep = sorted(set(range(len(texts))) - set(held))
    return keep, held


def greedy_reward(
    model: nn.Module, reward: Reward, ids: list[list[int]], texts: list[str], *,
    stops: Stops, pad_id: int, max_new_tokens: int, decode: Any,
) -> float:  # fmt: skip
    """Mean reward of the model's greedy answers to `ids` (NaN for none)."""
    from llmctl.train.rollout import complete

    if not ids:
        return float("nan")
    done, _ = complete(model, ids, GenerationParams(max_new_tokens=max_new_tokens),
                       stops=stops, pad_id=pad_id)  # fmt: skip
    bodies = [stops.body(c[0]) for c in done]
    ctx = model.config.max_seq_len
    fitted = [p[-(ctx - 1) :] for p in ids]
    scores = reward(Samples(fitted, bodies, texts, [decode(b) for b in bodies]))
    return float(scores.float().mean())


def run_online(
    checkpoint: Path,
    prompts: list[Path],
    out: Path,
    method: str,
    reward: str,
    cfg: OnlineConfig,
    *,
    force: bool = False,
) -> Path:
    """Train `checkpoint` with `method` (grpo|ppo) against `reward` on `prompts`; publish a
    checkpoint at `out` (an adapter with `cfg.lora`) and return it (see the module doc)."""
    from llmctl.data.chats import write_rejected
    from llmctl.data.prompts import load_prompts
    from llmctl.model.io import save_checkpoint
    from llmctl.tokenizer import chat_template_of, check_fits, decode, load_specials, load_tokenizer
    from llmctl.train import distributed
    from llmctl.train.experience import Rollouts
    from llmctl.train.rewards import load_reward
    from llmctl.train.run import train_and_publish

    if method not in METHODS:
        raise UsageError(f"--method {method}: online RL is one of {', '.join(METHODS)}")
    if method == "grpo" and cfg.group_size < 2:
        raise UsageError("config key 'group_size': GRPO compares samples of one prompt, so it "
                         f"needs >= 2, got {cfg.group_size}")  # fmt: skip
    ckpt = open_artifact(checkpoint, "checkpoint")
    tok = load_tokenizer(checkpoint)
    specials = load_specials(checkpoint)
    world = distributed.init(cfg.device)
    if world.size > 1 and cfg.distributed.strategy == "fsdp":
        raise UsageError("online RL: rollouts need whole weights on each rank; use ddp")
    scorer = load_reward(reward, tokenizer_dir=checkpoint, device=world.device,
                         pad_id=specials.pad_or_eos)  # fmt: skip
    policy = load_policy(checkpoint, world.device)
    check_fits(tok, policy.config.vocab_size, str(checkpoint))
    ctx = policy.config.max_seq_len
    template = chat_template_of(checkpoint)
    chat = None if cfg.chat == "auto" else cfg.chat == "yes"
    got = load_prompts(prompts, tok, template=template, chat=chat,
                       max_tokens=max(1, ctx - cfg.max_new_tokens), strict=cfg.strict)  # fmt: skip
    keep, held = split_held_out(got.texts, cfg.eval_prompts)
    if not keep:
        raise UsageError(f"{prompts[0]}: no prompt left to train on")
    if got.truncated and world.main:
        warn(f"{got.truncated:,} prompt(s) longer than {ctx - cfg.max_new_tokens} tokens kept "
             "their last tokens")  # fmt: skip

    ref = load_policy(checkpoint, world.device).eval().requires_grad_(False)
    lora_block = None
    if cfg.lora:  # only the adapter trains; the reference is the frozen checkpoint itself
        from llmctl.model.lora import apply_lora, describe_lora
        from llmctl.runtime import seed_everything

        seed_everything(cfg.seed)  # A's random init
        try:
            apply_lora(policy, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha)
        except ValueError as e:
            raise UsageError(f"config key 'lora_targets': {e}") from None
        lora_block = describe_lora(policy)
    if method == "ppo":
        attach_value_head(policy)
    use_chat = template is not None if chat is None else chat
    stop_ids = frozenset({specials.end_of_turn}) if use_chat or any(
        isinstance(p, list) for p in got.prompts) else frozenset()  # fmt: skip
    stops = Stops(cfg.max_new_tokens, eos_ids=frozenset({specials.eos}), stop_ids=stop_ids)
    pad = specials.pad_or_eos

    def dec(ids: list[int]) -> str:
        return decode(tok, ids, skip_special_tokens=True)

    batches = Rollouts(policy, ref, scorer, [got.ids[i] for i in keep],
                       [got.texts[i] for i in keep], cfg, stops=stops, pad_id=pad,
                       method=method, decode=dec, rank=world.rank, world=world.size)  # fmt: skip
    objective: Any = (
        GRPO(cfg.clip_eps, cfg.kl_coef) if method == "grpo"
        else PPO(cfg.clip_eps, cfg.vf_coef, cfg.vf_clip)
    )  # fmt: skip
    held_ids, held_texts = [got.ids[i] for i in held], [got.texts[i] for i in held]

    def probe(model: nn.Module, step: int) -> dict[str, float]:
        return {"eval_reward": greedy_reward(model, scorer, held_ids, held_texts, stops=stops,
                                             pad_id=pad, max_new_tokens=cfg.max_new_tokens,
                                             decode=dec)}  # fmt: skip

    reward_before = probe(ref, 0)["eval_reward"] if held else float("nan")
    reward_id: dict[str, Any] = {"spec": reward}
    spec_dir = Path(reward.partition(":")[2] if reward.startswith("judge") else reward)
    if (spec_dir / "model.safetensors").is_file():
        reward_id["weights"] = sha256_file(spec_dir / "model.safetensors")
    settings = {k: v for k, v in to_dict(cfg).items() if k not in COSMETIC}
    fingerprint = {"config": settings, "method": method, "checkpoint": ckpt.digest,
                   "prompts": [sha256_file(p) for p in prompts], "reward": reward_id}  # fmt: skip
    if world.main:
        info(f"{method}: {checkpoint}, {len(keep):,} train / {len(held):,} held-out prompts, "
             f"{cfg.batch_size}×{cfg.group_size} samples per micro-batch, reward {reward}, "
             f"{cfg.steps:,} steps; held-out reward before: {reward_before:.4f}")  # fmt: skip

    def save(dir: Path, final: nn.Module) -> None:
        if cfg.lora:
            from llmctl.model.adapter import save_adapter

            save_adapter(dir, final, base_digest=ckpt.digest, base_path=str(ckpt.path))
        else:
            files = {n: checkpoint / n for n in TOKENIZER_FILES if (checkpoint / n).is_file()}
            save_checkpoint(dir, final, files)  # model.aux (the value head) is left out
        write_rejected(dir, got.rejected)

    def stats(result: Any) -> dict[str, Any]:
        return {
            "rl": {
                "method": method,
                "reward": reward,
                "reward_before": reward_before,
                "reward_after": result.val_metrics.get("eval_reward"),
                "kl": result.metrics.get("kl"),
                "train_reward": result.metrics.get("reward"),
                "steps": result.steps,
            },
            "prompts": {**got.stats, "train": len(keep), "held_out": len(held)},
            # the published model's parameters (the value head in model.aux is not saved)
            "params": sum(
                p.numel()
                for n, p in policy.named_parameters()
                if not n.startswith("aux.") and "lora_" not in n
            ),
            **({"lora": lora_block} if lora_block else {}),
        }

    inputs = {"checkpoint": checkpoint, **{f"input-{i}": p for i, p in enumerate(prompts)}}
    result = train_and_publish(
        out, world=world, model=policy, batches=batches, objective=objective, cfg=cfg,
        fingerprint=fingerprint, command="align", config={**to_dict(cfg), "method": method,
        "reward": reward}, inputs=inputs, save=save, stats=stats,
        probes=[probe] if held else (), force=force, kind="adapter" if cfg.lora else "checkpoint",
    )  # fmt: skip
    if world.main:
        _summary(out, result)
    return out


def _summary(out: Path, s: dict[str, Any]) -> None:
    rl = s["rl"]

    def f(x: Any) -> str:
        return "-" if x is None else f"{x:.4f}"

    summary(f"align ({rl['method']}) → {out}", [
        ("reward", rl["reward"]),
        ("steps", f"{rl['steps']:,}" + (f" from {s['start_step']:,}" if s["start_step"] else "")),
        ("held-out reward before", f(rl["reward_before"])),
        ("held-out reward after", f(rl["reward_after"])),
        ("train reward (last window)", f(rl["train_reward"])),
        ("KL to reference", f(rl["kl"])),
        ("prompts", f"{s['prompts']['train']:,} train / {s['prompts']['held_out']:,} held out"),
        ("checkpoint", str(out)),
    ])  # fmt: skip
