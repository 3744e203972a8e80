"""Rollouts as the loop's batch stream: each micro-batch is sampled from the current policy.

`Rollouts` holds the model the loop trains (the same object), so `next(rollouts)`, which the
loop calls at the start of each micro-batch, samples with the weights of that step: no second
loop, no hook. Per micro-batch it picks `batch_size` prompts (a seeded permutation per pass over
the prompts), samples `group_size` responses each through `train.rollout.complete` (the
sampler and KV cache of `generate`; new tokens capped at the context), scores them with the
`Reward`, runs the frozen reference (and for PPO the value head) once without gradients, and
returns CPU tensors for `online.GRPO` / `online.PPO`.

Exact resume: the sampling seed of micro-batch i is `micro_seed(seed, i, stream=2)` and the
prompts depend only on i, so the rollouts of a resumed run are those of an uninterrupted one
(its weights restored bitwise by the loop). With `ppo_epochs = E > 1` a rollout serves E
optimizer steps; the cached rollout is part of `state_dict()` (saved with the loop's state).

Example:
    batches = Rollouts(policy, ref, reward, prompts, cfg, stops=stops, pad_id=pad, method="grpo",
                       decode=lambda ids: decode(tok, ids))
    train(policy, batches, GRPO(cfg.clip_eps, cfg.kl_coef), cfg, writer)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from llmctl.model.sample import GenerationParams, Stops
from llmctl.train.loop import autocast, micro_seed
from llmctl.train.online import (
    OnlineConfig,
    gae,
    group_advantages,
    kl_shaped_rewards,
    token_logprobs,
    whiten,
)
from llmctl.train.rewards import Reward, Samples
from llmctl.train.rollout import complete


def prompt_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Prompt indices at positions [start, start + count) of an endless sequence of seeded
    permutations of range(n) (one per pass)."""
    out = []
    for pos in range(start, start + count):
        epoch, k = divmod(pos, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[k]))
    return out


def _pad(rows: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out


class Rollouts:
    """This rank's rollout micro-batches (see the module doc)."""

    def __init__(
        self,
        policy: nn.Module,
        ref: nn.Module,
        reward: Reward,
        prompt_ids: Sequence[Sequence[int]],
        prompt_texts: Sequence[str],
        cfg: OnlineConfig,
        *,
        stops: Stops,
        pad_id: int,
        method: str,
        decode: Callable[[list[int]], str],
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.policy, self.ref, self.reward, self.cfg = policy, ref, reward, cfg
        self.prompt_ids, self.prompt_texts = prompt_ids, prompt_texts
        self.stops, self.pad_id, self.method, self.decode = stops, pad_id, method, decode
        self.rank, self.world = rank, world
        self.consumed = 0
        self.cache: dict[int, dict[str, torch.Tensor]] = {}

    def __iter__(self) -> Rollouts:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        A, E = self.cfg.grad_accum, self.cfg.ppo_epochs
        step, a = divmod(self.consumed, A)
        first = step - step % E  # the step whose policy sampled this rollout
        if step % E == 0 or a not in self.cache:
            index = (first * self.world + self.rank) * A + a
            batch = self.make(index, old_logp=E > 1)
            if E > 1:  # kept for the next E - 1 steps (and saved with the state)
                if step % E == 0 and a == 0:
                    self.cache = {}
                self.cache[a] = batch
        else:
            batch = self.cache[a]
        self.consumed += 1
        return batch

    @torch.no_grad()
    def make(self, index: int, *, old_logp: bool = False) -> dict[str, torch.Tensor]:
        """The rollout of global micro-batch `index` with the policy's current weights."""
        cfg, G = self.cfg, self.cfg.group_size
        chosen = prompt_order(len(self.prompt_ids), cfg.seed, index * cfg.batch_size,
                              cfg.batch_size)  # fmt: skip
        prompts = [list(self.prompt_ids[j]) for j in chosen]
        params = GenerationParams(
            max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=cfg.temperature,
            top_k=cfg.top_k, top_p=cfg.top_p, num_samples=G,
            seed=micro_seed(cfg.seed, index, stream=2),
        )  # fmt: skip
        done, _ = complete(self.policy, prompts, params, stops=self.stops, pad_id=self.pad_id)
        capped_prompt = [False] * len(prompts)
        fitted: list[list[int]] = []
        for i, p in enumerate(prompts):
            ctx = self.policy.config.max_seq_len
            fitted.append(p[-(ctx - 1) :])  # as complete cut it
            capped_prompt[i] = min(cfg.max_new_tokens, ctx - len(fitted[-1])) < cfg.max_new_tokens
        rows, mask_rows, bodies, texts, capped = [], [], [], [], []
        for i, comps in enumerate(done):
            for c in comps:
                resp = c.tokens or [self.pad_id]
                rows.append(fitted[i] + resp)
                mask_rows.append([0] * (len(fitted[i]) - 1) + [1] * len(resp))
                body = self.stops.body(c)
                bodies.append(body)
                texts.append(self.decode(body))
                capped.append(float(capped_prompt[i]))
        tokens = _pad(rows, self.pad_id)
        mask = _pad(mask_rows, 0)[:, : tokens.shape[1] - 1]
        rewards = self.reward(
            Samples([fitted[i // G] for i in range(len(rows))], bodies,
                    [self.prompt_texts[chosen[i // G]] for i in range(len(rows))], texts)
        ).float().cpu()  # fmt: skip
        device = next(self.policy.parameters()).device
        t = tokens.to(device)
        with autocast(device, cfg.dtype):
            ref_logp = token_logprobs(self.ref(t[:, :-1]), t[:, 1:]).cpu()
        batch = {"tokens": tokens, "mask": mask, "ref_logp": ref_logp, "rewards": rewards,
                 "capped": torch.tensor(capped)}  # fmt: skip
        need_policy = old_logp or self.method == "ppo"
        if need_policy:
            was = self.policy.training
            self.policy.eval()
            try:
                with autocast(device, cfg.dtype):
                    if self.method == "ppo":
                        logits, hidden = self.policy(t[:, :-1], return_hidden=True)
                        values = self.policy.aux["value"](hidden).squeeze(-1).float().cpu()
                    else:
                        logits = self.policy(t[:, :-1])
                    pol_logp = token_logprobs(logits, t[:, 1:]).cpu()
            finally:
                self.policy.train(was)
            if old_logp:
                batch["old_logp"] = pol_logp
        if self.method == "ppo":
            shaped = kl_shaped_rewards(rewards, pol_logp, ref_logp, mask, cfg.kl_coef)
            adv, returns = gae(shaped, values * mask, mask, cfg.gamma, cfg.lam)
            batch |= {"adv": whiten(adv, mask), "returns": returns, "values": values * mask}
        else:
            batch["adv"] = group_advantages(rewards, G, cfg.adv_eps)
        return batch

    def state_dict(self) -> dict[str, Any]:
        cache = {
            str(a): {k: [str(v.dtype).removeprefix("torch."), list(v.shape), v.flatten().tolist()]
                     for k, v in b.items()}
            for a, b in self.cache.items()
        }  # fmt: skip
        return {"consumed": self.consumed, "accum": self.cfg.grad_accum, "cache": cache}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["accum"] != self.cfg.grad_accum:
            raise ValueError("Rollouts: saved cursor is for a different grad_accum")
        self.consumed = int(state["consumed"])
        self.cache = {
            int(a): {k: torch.tensor(flat, dtype=getattr(torch, dt)).view(shape)
                     for k, (dt, shape, flat) in b.items()}
            for a, b in state.get("cache", {}).items()
        }  # fmt: skip
