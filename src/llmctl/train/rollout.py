"""Generation inside training (GRPO rollouts, sequence distillation, RLAIF candidates).

`complete` runs `model/sample.py`'s decoding on the model being trained without disturbing the
training: it unwraps DDP/compile wrappers, switches to eval mode (no dropout) and back, leaves
the weights' memory layout alone, and returns plain token lists (tensors made under inference
mode cannot be saved for backward; the objective rebuilds what it needs from ids).

It never fails on a short context: a prompt longer than the context leaves room for is cut
from the left (keeping its last tokens), and new tokens are capped at what the context leaves;
both are counted in the returned `RolloutStats`, so a recipe can see how often it happened.

Example:
    done, stats = complete(model, prompts, GenerationParams(max_new_tokens=32, do_sample=True,
                           seed=step), stops=Stops(32, eos_ids=specials.stop), pad_id=0)
    stats.capped  # rows whose new tokens were capped by the context
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from llmctl.model.sample import Completion, GenerationParams, Stops, generate
from llmctl.train.loop import unwrap


@dataclass
class RolloutStats:
    """What `complete` had to cut to fit the context."""

    prompts: int = 0
    truncated_prompts: int = 0  # prompts cut from the left to leave room for one new token
    capped: int = 0  # rows whose max_new_tokens was lowered to fit the context
    new_token_caps: list[int] = field(default_factory=list)  # the cap each capped row got


def complete(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: GenerationParams,
    *,
    stops: Stops,
    pad_id: int,
    first_index: int = 0,
    min_new_tokens: int = 1,
) -> tuple[list[list[Completion]], RolloutStats]:
    """Completions of each prompt (as `sample.generate`), fitted to the model's context:
    prompts longer than `max_seq_len - min_new_tokens` keep their last tokens, and each prompt
    generates at most what its context leaves. Consecutive prompts that leave the same room
    decode as one batch, so one long prompt does not cap the others, and each prompt's
    sampling seed stays tied to its index."""
    inner = unwrap(model)
    ctx = inner.config.max_seq_len
    keep = max(1, ctx - min_new_tokens)
    stats = RolloutStats(prompts=len(prompts))
    fitted = []
    for p in prompts:
        if len(p) > keep:
            stats.truncated_prompts += 1
            p = p[-keep:]
        fitted.append(list(p))
    rooms = [min(params.max_new_tokens, ctx - len(p)) for p in fitted]
    for room in rooms:
        if room < params.max_new_tokens:
            stats.capped += 1
            stats.new_token_caps.append(room)
    results: list[list[Completion]] = [[] for _ in fitted]
    was_training = inner.training
    inner.eval()
    try:
        start = 0
        while start < len(fitted):
            end = start
            while end < len(fitted) and rooms[end] == rooms[start]:
                end += 1
            p = replace(params, max_new_tokens=rooms[start])
            s = replace(stops, max_new_tokens=rooms[start])
            with torch.inference_mode():
                results[start:end] = generate(
                    inner, fitted[start:end], p, stops=s, pad_id=pad_id,
                    first_index=first_index + start,
                )  # fmt: skip
            start = end
    finally:
        inner.train(was_training)
    return results, stats
