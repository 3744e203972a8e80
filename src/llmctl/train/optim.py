"""The optimizer and learning-rate schedule every training command shares.

AdamW with two parameter groups: matrices decay, while norms, biases and embeddings do not
(decaying a gain or a lookup table towards zero only hurts). Fused kernels on CUDA. The LR
schedule is a linear warmup then a cosine decay to `min_lr_ratio * lr`, a pure function of the
step, so resuming needs nothing but the step.

Example:
    opt = build_optimizer(model, lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95))
    sched = Schedule(lr=3e-4, warmup=100, total=5000, min_lr_ratio=0.1)
    set_lr(opt, sched(step))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight matrices of linear layers decay, everything else does not.

    "Everything else" is norms' gains and biases, every bias, and embedding tables (including a
    tied lm head, which is the token embedding). Frozen parameters are left out, so the same
    call serves LoRA. Parameters are listed once even when tied.
    """
    embedding_ids = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding | nn.EmbeddingBag)
    }
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # dedups tied parameters
        if not p.requires_grad:
            continue
        if p.ndim >= 2 and id(p) not in embedding_ids:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.1,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`, fused when the parameters live on CUDA."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


@dataclass(frozen=True)
class Schedule:
    """Linear warmup over `warmup` steps, then cosine decay from `lr` to `min_lr_ratio * lr`
    at step `total`. Steps count from 0; `sched(step)` is the LR used by optimizer step `step`.

    Example: Schedule(lr=1e-3, warmup=10, total=100)(0) == 1e-4
    """

    lr: float
    warmup: int
    total: int
    min_lr_ratio: float = 0.1

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        floor = self.lr * self.min_lr_ratio
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return floor + 0.5 * (self.lr - floor) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
