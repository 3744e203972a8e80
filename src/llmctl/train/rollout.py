"""Generation inside training (GRPO rollouts, sequence distillation, RLAIF candidates), and a
checkpoint's answers to prompts for sequence distillation (`checkpoint_answers`).

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmctl.model.sample import Completion, GenerationParams, Stops, generate
from llmctl.runtime import warn
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


def checkpoint_answers(
    model: nn.Module,
    checkpoint: Path,
    prompts: Sequence[Any],
    params: GenerationParams,
    cache: Any,
    *,
    chat: bool,
    batch_size: int,
    advance: Callable[[int], None] | None = None,
) -> tuple[list[Any], Any]:
    """A checkpoint's answers to `prompts` (strings, or message lists rendered with its chat
    template), through `complete` and `data/answers.model_answers` (cached in `cache`,
    `batch_size` prompts a call): the teacher of sequence distillation. With `chat`, plain
    prompts are rendered as one user turn too, and the end-of-turn token stops each answer."""
    from llmctl.data.answers import model_answers
    from llmctl.tokenizer import (
        chat_template_of,
        decode,
        encode,
        encode_prompt,
        load_specials,
        load_tokenizer,
        render_chat,
    )

    tok = load_tokenizer(checkpoint)
    specials = load_specials(checkpoint)
    template = chat_template_of(checkpoint)

    def encode_one(p: Any) -> list[int]:
        if isinstance(p, list) or chat:
            msgs = p if isinstance(p, list) else [{"role": "user", "content": p}]
            return encode(tok, render_chat(msgs, add_generation_prompt=True, template=template))
        return encode_prompt(tok, p)

    stop_ids = frozenset(params.stop_token_ids) | (
        frozenset({specials.end_of_turn}) if chat or any(isinstance(p, list) for p in prompts)
        else frozenset()
    )  # fmt: skip
    stops = Stops(params.max_new_tokens, eos_ids=frozenset({specials.eos}), stop_ids=stop_ids,
                  strings=tuple(params.stop), decode=lambda ids: decode(tok, ids))  # fmt: skip
    capped = [0]

    def answer_batch(ids: list[list[int]], first: int) -> list[str]:
        done, rs = complete(model, ids, params, stops=stops, pad_id=specials.pad_or_eos,
                            first_index=first)  # fmt: skip
        capped[0] += rs.capped + rs.truncated_prompts
        return [c[0].text for c in done]

    got, stats = model_answers(prompts, encode_one, answer_batch, cache, batch_size=batch_size,
                               on_answer=advance)  # fmt: skip
    if capped[0]:
        warn(f"{capped[0]:,} prompt(s) were cut or had their new tokens capped by the teacher's "
             "context")  # fmt: skip
    return got, stats
