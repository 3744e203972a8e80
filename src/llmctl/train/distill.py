"""Distillation objectives: a frozen teacher's logits and hidden states teach a student.

Two pure loss functions and two objectives for the one loop:

- `divergence(student, teacher, temperature, beta, top_k)`: per position, the divergence
  between the temperature-softened teacher and student distributions, as TRL's GKD defines it
  (`generalized_jsd_loss`): beta = 0 is the forward KL(teacher ‖ student), beta = 1 the reverse
  KL(student ‖ teacher), and 0 < beta < 1 the generalized JSD
  beta · KL(teacher ‖ M) + (1 − beta) · KL(student ‖ M) with M = beta · teacher + (1 − beta) ·
  student. `top_k > 0` keeps the teacher's k most likely tokens and lumps the rest of each
  distribution into one "other" bucket, so every divergence stays finite and exact at k = V.
- `feature_loss(student_h, teacher_h, kind)`: per position, MSE (mean over the width) or
  1 − cosine between a (projected) student hidden state and the teacher's.

`LogitDistill` sums over target positions alpha · T² · divergence + (1 − alpha) · CE(data);
`FeatureDistill` adds weight · Σ_pairs feature_loss over the layer pairs (`layer_map`: student
layer i of L_s matched to teacher layer round((i + 1) · L_t / L_s) − 1 by default, so last meets
last), through a learned `nn.Linear` per pair in `model.aux["distill_proj"]` when the widths
differ (it trains with the student and is dropped from the saved checkpoint). Both report
`kl`, `ce` (and `feature`) as metrics. The teacher is held by the objective, not the model: it
is frozen (`requires_grad=False`), in eval mode, runs under `torch.no_grad()`, and is never in
the optimizer, the DDP/FSDP wrapper or the training state (the command puts its digest into
the resume fingerprint).

Example:
    obj = LogitDistill(teacher, temperature=2.0, alpha=0.5, beta=0.0)
    out = obj(student, {"tokens": ids}, gen)   # out.metrics["kl"], out.metrics["ce"]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.errors import UsageError
from llmctl.train.loop import unwrap
from llmctl.train.objectives import IGNORE, LossOutput

PROJ = "distill_proj"  # the key of the feature projections in model.aux


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dim from log-probabilities; terms where p = 0 count 0 (also
    where q = 0 there: a lumped bucket that is empty in both)."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def _lumped(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the ids `idx` [..., k] plus one last bucket holding the rest."""
    kept = logp.gather(-1, idx)
    rest = logp.scatter(-1, idx, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([kept, rest], dim=-1)


def divergence(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.0,
    top_k: int = 0,
) -> torch.Tensor:
    """Per-position divergence [...] between softmax(teacher / T) and softmax(student / T)
    (logits [..., V], computed in fp32): forward KL at beta = 0, reverse KL at beta = 1, the
    generalized JSD between (TRL GKD). Not multiplied by T² (the objective does that)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    ls = F.log_softmax(student.float() / temperature, dim=-1)
    lt = F.log_softmax(teacher.float() / temperature, dim=-1)
    if 0 < top_k < ls.shape[-1]:
        idx = teacher.topk(top_k, dim=-1).indices
        ls, lt = _lumped(ls, idx), _lumped(lt, idx)
    if beta == 0.0:
        return _kl(lt, ls)
    if beta == 1.0:
        return _kl(ls, lt)
    mix = torch.logaddexp(ls + math.log(1 - beta), lt + math.log(beta))
    return beta * _kl(lt, mix) + (1 - beta) * _kl(ls, mix)


def feature_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Per-position distance [...] between hidden states [..., d] of equal width (fp32):
    `mse` = mean squared difference over d; `cosine` = 1 − cosine similarity."""
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return (s - t).pow(2).mean(-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    raise ValueError(f"feature loss must be mse or cosine, got {kind!r}")


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """The teacher layer (0-based block index) each student layer is matched to: evenly spaced,
    round((i + 1) · L_t / L_s) − 1 with halves rounded up, so the last meets the last.
    >>> layer_map(4, 6)
    [1, 2, 4, 5]"""
    return [
        math.floor((i + 1) * teacher_layers / student_layers + 0.5) - 1
        for i in range(student_layers)
    ]


def freeze(teacher: nn.Module) -> nn.Module:
    """The teacher made a constant: no gradients, eval mode (no dropout)."""
    teacher.requires_grad_(False)
    return teacher.eval()


def _targets(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [B, T], labels [B, T] with IGNORE where no loss is taken)."""
    tokens = batch["tokens"]
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    if "loss_mask" in batch:
        labels = labels.masked_fill(batch["loss_mask"][:, 1:] == 0, IGNORE)
    return inputs, labels


def _run(
    model: nn.Module, inputs: torch.Tensor, layers: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits, hidden states of `layers`) of one forward pass."""
    if layers:
        logits, hidden = model(inputs, hidden_layers=layers)
        return logits, hidden
    return model(inputs), []


@dataclass
class LogitDistill:
    """alpha · T² · divergence(teacher ‖ student) + (1 − alpha) · cross-entropy on the data,
    summed over target positions. Batch: `tokens` [B, T+1], optional `loss_mask`."""

    teacher: nn.Module
    temperature: float = 1.0
    alpha: float = 0.5
    beta: float = 0.0
    top_k: int = 0
    extra_tokens: int = 1

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise UsageError(f"config key 'temperature': must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise UsageError(f"config key 'alpha': must be in [0, 1], got {self.alpha}")
        if not 0.0 <= self.beta <= 1.0:
            raise UsageError(f"config key 'beta': must be in [0, 1], got {self.beta}")
        if self.top_k < 0:
            raise UsageError(f"config key 'top_k': must be >= 0, got {self.top_k}")
        freeze(self.teacher)

    def check(self, model: nn.Module) -> None:
        cfg, tcfg = unwrap(model).config, self.teacher.config
        if not getattr(cfg, "causal", True) or not getattr(tcfg, "causal", True):
            raise UsageError("distillation needs causal student and teacher models")
        if cfg.vocab_size != tcfg.vocab_size:
            raise UsageError(
                f"student vocab_size {cfg.vocab_size} != teacher vocab_size {tcfg.vocab_size}: "
                "logit distillation needs one vocabulary"
            )

    def hidden_pairs(self) -> tuple[list[int], list[int]]:
        """(student, teacher) hidden_layers to ask the models for; none here."""
        return [], []

    def extra(
        self, model: nn.Module, hs: Sequence[torch.Tensor], ht: Sequence[torch.Tensor],
        keep: torch.Tensor,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """Further loss terms over the kept positions: {name: (summed term, summed metric)}."""
        return {}

    def __call__(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> LossOutput:
        inputs, labels = _targets(batch)
        s_layers, t_layers = self.hidden_pairs()
        with torch.no_grad():
            t_logits, ht = _run(self.teacher, inputs, t_layers)
        s_logits, hs = _run(model, inputs, s_layers)
        keep = labels != IGNORE
        count = keep.sum()
        ce = F.cross_entropy(
            s_logits.reshape(-1, s_logits.shape[-1]).float(), labels.reshape(-1),
            ignore_index=IGNORE, reduction="sum",
        )  # fmt: skip
        div = divergence(s_logits[keep], t_logits[keep], temperature=self.temperature,
                         beta=self.beta, top_k=self.top_k).sum()  # fmt: skip
        total = self.alpha * self.temperature**2 * div + (1 - self.alpha) * ce
        metrics: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
            "kl": (div.detach(), count),
            "ce": (ce.detach(), count),
        }
        for name, (term, value) in self.extra(model, hs, ht, keep).items():
            total = total + term
            metrics[name] = (value.detach(), count)
        return LossOutput(total, count, tokens=inputs.numel(), metrics=metrics)


@dataclass
class FeatureDistill(LogitDistill):
    """The logit objective plus `weight` · Σ over layer pairs of `feature_loss` between the
    student's hidden state (through a learned projection when the widths differ) and the
    teacher's. `pairs` [(student layer, teacher layer)] are 0-based block indices; the hidden
    state of block i is its output (the residual stream), `hidden_layers=i + 1`."""

    pairs: Sequence[tuple[int, int]] = field(default_factory=list)
    loss: str = "mse"
    weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in ("mse", "cosine"):
            raise UsageError(f"config key 'feature.loss': mse or cosine, got {self.loss!r}")
        if self.weight < 0:
            raise UsageError(f"config key 'feature.weight': must be >= 0, got {self.weight}")
        if not self.pairs:
            raise UsageError("feature distillation: no layer pairs to match (feature.layers)")

    def attach(self, model: nn.Module) -> None:
        """Give `model` one projection per layer pair in `model.aux` when the student's width
        differs from the teacher's (call before training builds the optimizer)."""
        inner = unwrap(model)
        d_s, d_t = inner.config.d_model, self.teacher.config.d_model
        L_s, L_t = inner.config.n_layer, self.teacher.config.n_layer
        for s, t in self.pairs:
            if not (0 <= s < L_s and 0 <= t < L_t):
                raise UsageError(
                    f"config key 'feature.layers': pair ({s}, {t}) is outside the student's "
                    f"{L_s} or the teacher's {L_t} layers"
                )
        if d_s != d_t and PROJ not in inner.aux:
            device = inner.tok_emb.weight.device
            proj = nn.ModuleList(nn.Linear(d_s, d_t, bias=False) for _ in self.pairs)
            for lin in proj:
                nn.init.normal_(lin.weight, std=1.0 / math.sqrt(d_s))
            inner.aux[PROJ] = proj.to(device)

    def hidden_pairs(self) -> tuple[list[int], list[int]]:
        return [s + 1 for s, _ in self.pairs], [t + 1 for _, t in self.pairs]

    def extra(
        self, model: nn.Module, hs: Sequence[torch.Tensor], ht: Sequence[torch.Tensor],
        keep: torch.Tensor,
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        aux = unwrap(model).aux
        proj = aux[PROJ] if PROJ in aux else None  # noqa: SIM401 (ModuleDict has no get)
        total = torch.zeros((), device=keep.device)
        for j, (h_s, h_t) in enumerate(zip(hs, ht, strict=True)):
            x = h_s[keep]
            if proj is not None:
                x = proj[j](x)
            total = total + feature_loss(x, h_t[keep], self.loss).sum()
        return {"feature": (self.weight * total, total)}
