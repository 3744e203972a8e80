"""Training objectives: what the one loop minimizes.

An objective is called as `objective(model, batch, generator) -> LossOutput`. It returns the
loss *summed* over `count` items (target tokens, pairs, ...), so the loop can normalize over a
whole optimizer step, across micro-batches and ranks, exactly: the gradient of one step is that
of sum(losses) / sum(counts), however the batch is split. `generator` is a CPU torch.Generator
the loop seeds per micro-batch; objectives draw all their randomness from it, so masks do not
depend on the device, the process count or an interruption. `extra_tokens` tells the batch
stream how many tokens beyond the model's context each row needs. `check(model)` refuses a
model the objective cannot train.

Example:
    out = NextToken()(model, {"tokens": torch.randint(0, 256, (4, 65))}, gen)
    loss = out.total / out.count
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from llmctl.errors import UsageError
from llmctl.model.gpt import IGNORE, token_loss

__all__ = ["IGNORE", "LossOutput", "MaskedLM", "Metric", "NextToken", "Objective", "token_loss"]


# A metric an objective reports: (sum, count) over the micro-batch's items, as tensors on the
# device (no .item()); the loop adds them up over a log window and across ranks, then logs
# sum / count. An objective returns the same metric names on every call.
Metric = tuple[torch.Tensor, torch.Tensor]


@dataclass
class LossOutput:
    """One micro-batch's loss: `total` (summed, differentiable) over `count` items; `tokens`
    is how many positions the model processed (for throughput); `metrics` adds anything else
    (e.g. {"accuracy": (correct.sum(), n)}), each reduced as sum / count."""

    total: torch.Tensor
    count: torch.Tensor
    tokens: int
    metrics: dict[str, Metric] = field(default_factory=dict)


class EmptyLossMask(UsageError):
    """A batch's loss mask selects no token: training on it would report a zero loss."""


class Objective(Protocol):
    extra_tokens: int

    def check(self, model: nn.Module) -> None: ...

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> LossOutput: ...


def _config(model: nn.Module) -> Any:
    inner = getattr(model, "_orig_mod", model)  # torch.compile
    inner = getattr(inner, "module", inner)  # DDP
    return getattr(inner, "config", None)


@dataclass
class NextToken:
    """Causal language modelling: predict token t+1 from tokens ≤ t.

    Batch: `tokens` [B, T+1]; optional `loss_mask` [B, T+1] (1 where a token counts as a
    target, e.g. only the assistant's reply in SFT); position 0 is never a target. Packed
    rows add `position_ids` and `segment_ids` [B, T+1] (see `GPT.forward`). A micro-batch
    whose mask leaves no target is an error (`EmptyLossMask`), never a silent zero loss.
    """

    extra_tokens: int = 1

    def check(self, model: nn.Module) -> None:
        cfg = _config(model)
        if cfg is not None and not getattr(cfg, "causal", True):
            raise UsageError(
                "next-token training needs a causal model; this one has causal=false "
                "(use objective=mlm, or model.causal=true)"
            )

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> LossOutput:
        tokens = batch["tokens"]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        if "loss_mask" in batch:
            keep = batch["loss_mask"][:, 1:] != 0
            # On the CPU the check is free; on CUDA it would be a host sync per micro-batch, so
            # there the batch stream checks its masks (ChatRows.sample) and a step without a
            # target still stops the loop (its loss is 0/0).
            if keep.device.type == "cpu" and not bool(keep.any()):
                raise EmptyLossMask(
                    "next-token loss: the loss mask of this micro-batch is all zero (no target "
                    "token); the data gives the model nothing to learn here"
                )
            labels = labels.masked_fill(~keep, IGNORE)
        packed = {k: batch[k][:, :-1] for k in ("position_ids", "segment_ids") if k in batch}
        # the loss inside the (compiled) forward
        total, count = model(inputs, labels=labels, **packed)
        return LossOutput(total, count, tokens=inputs.numel())


@dataclass
class MaskedLM:
    """BERT's masked language modelling on a bidirectional model.

    Of the non-special tokens, `prob` (15%) are chosen as targets; a chosen token is replaced by
    `mask_id` 80% of the time, by a random non-special token 10%, and kept 10%. Special tokens
    (`special_ids`) are never chosen and never drawn as random replacements.
    Batch: `tokens` [B, T].
    """

    mask_id: int
    vocab_size: int
    special_ids: Iterable[int]
    prob: float = 0.15
    extra_tokens: int = 0

    def __post_init__(self) -> None:
        special = sorted(set(self.special_ids) | {self.mask_id})
        self.special = torch.tensor(special, dtype=torch.long)
        keep = torch.ones(self.vocab_size, dtype=torch.bool)
        keep[self.special[self.special < self.vocab_size]] = False
        self.ordinary = keep.nonzero().squeeze(1)
        if not 0.0 < self.prob < 1.0:
            raise UsageError(f"masked LM: mask probability must be in (0, 1), got {self.prob}")
        if self.ordinary.numel() == 0:
            raise UsageError("masked LM: the vocabulary has no non-special tokens")

    def check(self, model: nn.Module) -> None:
        cfg = _config(model)
        if cfg is not None and getattr(cfg, "causal", False):
            raise UsageError(
                "masked-LM training needs a bidirectional model, but this one is causal: "
                "set model.causal=false (or use objective=causal)"
            )

    def mask(
        self, tokens: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) for `tokens` [B, T]: labels hold the original token at chosen
        positions and IGNORE elsewhere. The random draws are made on the CPU, so masks are
        the same on every device."""
        shape, dev = tokens.shape, tokens.device
        chosen = (torch.rand(shape, generator=generator) < self.prob).to(dev)
        how = torch.rand(shape, generator=generator).to(dev)
        pick = torch.randint(len(self.ordinary), shape, generator=generator).to(dev)
        chosen &= ~torch.isin(tokens, self.special.to(dev))
        inputs = torch.where(chosen & (how < 0.8), self.mask_id, tokens)
        random_tok = chosen & (how >= 0.8) & (how < 0.9)
        inputs = torch.where(random_tok, self.ordinary.to(dev)[pick], inputs)
        labels = torch.where(chosen, tokens, IGNORE)
        return inputs, labels

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> LossOutput:
        inputs, labels = self.mask(batch["tokens"], generator)
        total, count = model(inputs, labels=labels)
        return LossOutput(total, count, tokens=inputs.numel())
