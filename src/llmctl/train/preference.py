"""Preference objectives for the one loop: DPO, IPO, SimPO, ORPO, KTO and a Bradley–Terry
reward model.

Each loss is a small pure function of per-sequence log-probs (or scores) returning per-item
losses, so it can be checked against its closed form; `LOSSES` maps a method to it. An
objective runs one forward over a micro-batch's 2B rows (chosen rows, then rejected rows; for
KTO the completions, then their KL rows), sums each row's log-probs over its answer tokens
and returns the loss summed over the B items with metrics as (sum, count) pairs:
`accuracy` (the policy's own preference: its score of chosen > of rejected, comparable with
the base's at step 0), `reward_accuracy` (the implicit rewards', as TRL's
`rewards/accuracies`), `margin` (reward chosen − rejected), `chosen_logp`, `rejected_logp`,
`reward_chosen`, `reward_rejected`. Reference log-probs come with the batch (`ref`, [2B], from
the cache of `reference_logps`) or from a frozen `reference` module run here (uncached).

Formulas (h = (πc − ρc) − (πr − ρr), log-probs summed unless said; σ the logistic):
  DPO   −(1−ε)·logσ(βh) − ε·logσ(−βh)                   (cDPO label smoothing ε; TRL sigmoid)
  IPO   (h − 1/(2β))², on mean log-probs per token       (TRL `ipo`)
  SimPO −(1−ε)·logσ(β(π̄c − π̄r) − γ) − ε·logσ(−β(π̄c − π̄r) + γ), π̄ = mean log-prob
  ORPO  NLL(c) − λ·logσ(log odds(π̄c) − log odds(π̄r)), odds(p) = p/(1−p), NLL per token
  KTO   w_d·(1 − σ(β(π − ρ − z))) for desirable, w_u·(1 − σ(β(z − π + ρ))) for undesirable;
        z = max(0, mean over the micro-batch of the KL rows' π − ρ), detached
  BT    −logσ(s_c − s_r) on the reward model's scores at the last real token

Example:
    obj = PairObjective("dpo", beta=0.1)
    out = obj(model, batch, gen)    # batch: tokens, loss_mask [2B, L], ref [2B], ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.errors import UsageError
from llmctl.train.objectives import LossOutput, Metric, _config

# --- the losses: pure functions of log-probs ---------------------------------------------------


def dpo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, *,
             beta: float, label_smoothing: float = 0.0) -> torch.Tensor:  # fmt: skip
    """Per-pair DPO loss (Rafailov et al.), with cDPO's label smoothing ε."""
    h = (pc - rc) - (pr - rr)
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(
        -beta * h
    )


def ipo_loss(pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, *,
             beta: float) -> torch.Tensor:  # fmt: skip
    """Per-pair IPO loss (Azar et al.): (h − 1/(2β))². Give mean log-probs (as TRL does)."""
    h = (pc - rc) - (pr - rr)
    return (h - 1 / (2 * beta)) ** 2


def simpo_loss(pc: torch.Tensor, pr: torch.Tensor, *, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> torch.Tensor:  # fmt: skip
    """Per-pair SimPO loss (Meng et al.) on mean log-probs per token, target margin γ."""
    z = beta * (pc - pr) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def orpo_loss(pc: torch.Tensor, pr: torch.Tensor, nll: torch.Tensor, *,
              lam: float) -> torch.Tensor:  # fmt: skip
    """Per-pair ORPO loss (Hong et al.): NLL of chosen (per token) − λ·logσ(log odds ratio),
    on mean log-probs per token (< 0)."""
    log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
    return nll - lam * F.logsigmoid(log_odds)


def kto_loss(p: torch.Tensor, r: torch.Tensor, label: torch.Tensor, z: torch.Tensor, *,
             beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Per-item KTO loss (Ethayarajh et al.; TRL's form) against the reference point `z`."""
    ratio = p - r
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - z)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio)))
    return torch.where(label.bool(), good, bad)


def kto_reference_point(p_kl: torch.Tensor, r_kl: torch.Tensor) -> torch.Tensor:
    """z: the mean log-ratio of the KL rows (mismatched prompt/completion), at least 0, no
    gradient (TRL: `kl = (policy_KL_logps - reference_KL_logps).mean().clamp(min=0)`)."""
    return (p_kl - r_kl).mean().clamp(min=0).detach()


def bt_loss(sc: torch.Tensor, sr: torch.Tensor) -> torch.Tensor:
    """Per-pair Bradley–Terry loss of a reward model: −logσ(s_chosen − s_rejected)."""
    return -F.logsigmoid(sc - sr)


# --- log-probs of rows ---------------------------------------------------------------------------


def sequence_logps(
    model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log-probs over each row's answer tokens, their count), both [R], in fp32.
    `tokens`, `mask` [R, L]: mask[t] = 1 where token t is a target (predicted from t − 1)."""
    logits = model(tokens[:, :-1])
    lp = -F.cross_entropy(logits.float().transpose(1, 2), tokens[:, 1:], reduction="none")
    m = mask[:, 1:].to(lp.dtype)
    return (lp * m).sum(-1), m.sum(-1)


def _mean(values: torch.Tensor) -> Metric:
    v = values.detach().float()
    return v.sum(), torch.tensor(float(v.numel()), device=v.device)


def _frac(flags: torch.Tensor) -> Metric:
    return _mean(flags.float())


@dataclass
class PairObjective:
    """DPO, IPO, SimPO or ORPO on pair batches (see the module doc for keys and formulas).
    `reference`: a frozen module computing reference log-probs per micro-batch when the batch
    has no cached `ref` (the uncached mode); SimPO and ORPO use no reference."""

    method: str
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    extra_tokens: int = 1

    def __post_init__(self) -> None:
        if self.method not in ("dpo", "ipo", "simpo", "orpo"):
            raise UsageError(f"pair objective: unknown method {self.method!r}")

    @property
    def needs_reference(self) -> bool:
        return self.method in ("dpo", "ipo")

    def check(self, model: nn.Module) -> None:
        _check_lm(model)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 generator: torch.Generator) -> LossOutput:  # fmt: skip
        tokens, mask = batch["tokens"], batch["loss_mask"]
        B = tokens.shape[0] // 2
        logp, n = sequence_logps(model, tokens, mask)
        n = n.clamp(min=1)
        mean = logp / n
        pc, pr = logp[:B], logp[B:]
        m = self.method
        if self.needs_reference:
            ref = _reference(batch, self.reference)
            rc, rr = ref[:B], ref[B:]
            if m == "dpo":
                losses = dpo_loss(
                    pc, pr, rc, rr, beta=self.beta, label_smoothing=self.label_smoothing
                )
                own_c, own_r = pc, pr
            else:  # IPO on mean log-probs per token
                rn = ref / n
                losses = ipo_loss(mean[:B], mean[B:], rn[:B], rn[B:], beta=self.beta)
                own_c, own_r = mean[:B], mean[B:]
                pc, pr, rc, rr = mean[:B], mean[B:], rn[:B], rn[B:]
            rew_c, rew_r = self.beta * (pc - rc).detach(), self.beta * (pr - rr).detach()
        else:
            own_c, own_r = mean[:B], mean[B:]
            if m == "simpo":
                losses = simpo_loss(own_c, own_r, beta=self.beta, gamma=self.simpo_gamma,
                                    label_smoothing=self.label_smoothing)  # fmt: skip
            else:
                losses = orpo_loss(own_c, own_r, -own_c, lam=self.orpo_lambda)
            rew_c, rew_r = self.beta * own_c.detach(), self.beta * own_r.detach()
        metrics = _pair_metrics(own_c > own_r, rew_c, rew_r, logp[:B], logp[B:])
        count = torch.tensor(float(B), device=tokens.device)
        return LossOutput(losses.sum(), count, tokens=tokens.numel(), metrics=metrics)


def _pair_metrics(own: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, lc: torch.Tensor,
                  lr: torch.Tensor) -> dict[str, Metric]:  # fmt: skip
    return {
        "accuracy": _frac(own),
        "reward_accuracy": _frac(rc > rr),
        "margin": _mean(rc - rr),
        "reward_chosen": _mean(rc),
        "reward_rejected": _mean(rr),
        "chosen_logp": _mean(lc),
        "rejected_logp": _mean(lr),
    }


def _reference(batch: dict[str, torch.Tensor], reference: Any) -> torch.Tensor:
    if "ref" in batch:
        return batch["ref"].float()
    if reference is None:
        raise UsageError("preference objective: no cached reference log-probs and no reference")
    return reference(batch["tokens"], batch["loss_mask"])


def _check_lm(model: nn.Module) -> None:
    cfg = _config(model)
    if cfg is not None and not getattr(cfg, "causal", True):
        raise UsageError("preference training needs a causal model; this one has causal=false")
    if cfg is not None and getattr(cfg, "head", "lm") != "lm":
        raise UsageError("this is a reward model (head = score): it has no log-probs to align")


@dataclass
class KTOObjective:
    """KTO on items with labels: rows [B completions; B KL rows], `label` [B], `ref` [2B]."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    extra_tokens: int = 1
    method: str = "kto"
    needs_reference: bool = True

    def check(self, model: nn.Module) -> None:
        _check_lm(model)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 generator: torch.Generator) -> LossOutput:  # fmt: skip
        tokens, label = batch["tokens"], batch["label"]
        B = tokens.shape[0] // 2
        logp, _ = sequence_logps(model, tokens, batch["loss_mask"])
        ref = _reference(batch, self.reference)
        z = kto_reference_point(logp[B:], ref[B:])
        p, r = logp[:B], ref[:B]
        losses = kto_loss(p, r, label, z, beta=self.beta, desirable_weight=self.desirable_weight,
                          undesirable_weight=self.undesirable_weight)  # fmt: skip
        reward = self.beta * (p - r).detach()
        good = label.bool()
        dev = tokens.device
        zero = torch.zeros((), device=dev)

        def part(values: torch.Tensor, keep: torch.Tensor) -> Metric:
            return torch.where(keep, values, zero).sum(), keep.float().sum()

        metrics = {
            "accuracy": _frac(torch.where(good, reward > 0, reward < 0)),
            "reward_chosen": part(reward, good),
            "reward_rejected": part(reward, ~good),
            "chosen_logp": part(p.detach(), good),
            "rejected_logp": part(p.detach(), ~good),
            "kl": (z * 1.0, torch.ones((), device=dev)),
        }
        count = torch.tensor(float(B), device=dev)
        return LossOutput(losses.sum(), count, tokens=tokens.numel(), metrics=metrics)


def last_scores(model: nn.Module, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """A reward model's score of each row [R], read at its last real token (rows are
    right-padded, so the causal model never saw the padding there)."""
    scores = model(tokens)[..., 0].float()  # [R, L]
    return scores.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]


@dataclass
class RewardObjective:
    """Bradley–Terry on pair batches with a `head = "score"` model; rows [B chosen; B
    rejected], `lengths` [2B]."""

    extra_tokens: int = 0
    method: str = "reward"
    needs_reference: bool = False

    def check(self, model: nn.Module) -> None:
        cfg = _config(model)
        if cfg is not None and getattr(cfg, "head", "lm") != "score":
            raise UsageError("the reward objective needs a model with head = score")

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor],
                 generator: torch.Generator) -> LossOutput:  # fmt: skip
        tokens = batch["tokens"]
        B = tokens.shape[0] // 2
        s = last_scores(model, tokens, batch["lengths"])
        sc, sr = s[:B], s[B:]
        losses = bt_loss(sc, sr)
        metrics = {
            "accuracy": _frac(sc > sr),
            "margin": _mean(sc - sr),
            "reward_chosen": _mean(sc),
            "reward_rejected": _mean(sr),
        }
        count = torch.tensor(float(B), device=tokens.device)
        return LossOutput(losses.sum(), count, tokens=tokens.numel(), metrics=metrics)


# --- the reference: computed once, and the KL probe ----------------------------------------------


@torch.no_grad()
def reference_logps(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    n_items: int,
    *,
    device: torch.device,
    precision: str = "auto",
) -> torch.Tensor:
    """Summed answer log-probs of both rows of every item, [n_items, 2] fp32 (row 0: chosen or
    the completion; row 1: rejected or the KL row), from `batches` of `PairRows.make`."""
    from llmctl.train.batches import as_tensors
    from llmctl.train.loop import autocast

    was = model.training
    model.eval()
    out = torch.full((n_items, 2), math.nan, dtype=torch.float32)
    try:
        for b in batches:
            t = as_tensors(b)
            with autocast(device, precision):
                logp, _ = sequence_logps(model, t["tokens"].to(device), t["loss_mask"].to(device))
            B = len(t["index"])
            out[t["index"], 0] = logp[:B].float().cpu()
            out[t["index"], 1] = logp[B:].float().cpu()
    finally:
        model.train(was)
    return out


def kl_probe(
    model: nn.Module,
    batches: Callable[[], Iterable[dict[str, torch.Tensor]]],
    reference: Callable[[], Any],
) -> Callable[[nn.Module, int], dict[str, float]]:
    """A loop probe: the mean per-token KL(π ‖ reference) over the chosen answers of the
    held-out `batches`, from the full next-token distributions. `reference()` is a context
    manager yielding the reference module (a frozen copy, or the model with its adapters
    off)."""

    def probe(m: nn.Module, step: int) -> dict[str, float]:
        device = next(m.parameters()).device
        total = torch.zeros((), dtype=torch.float64, device=device)
        count = 0.0
        for b in batches():
            B = len(b["index"])
            tokens = b["tokens"][:B].to(device)
            mask = b["loss_mask"][:B, 1:].to(device).float()
            lp = F.log_softmax(m(tokens[:, :-1]).float(), -1)
            with reference() as ref:
                lq = F.log_softmax(ref(tokens[:, :-1]).float(), -1)
            kl = (lp.exp() * (lp - lq)).sum(-1)
            total += (kl * mask).sum().double()
            count += float(mask.sum())
        return {"val_kl": total.item() / count if count else math.nan}

    return probe


def frozen(module: nn.Module) -> Callable[[], Any]:
    """`reference()` for `kl_probe` over a frozen module."""
    return lambda: nullcontext(module)


@torch.no_grad()
def pairwise_accuracy(
    model: nn.Module, batches: Iterable[dict[str, Any]], *, device: torch.device
) -> dict[str, float]:
    """A reward model's figures over pair batches: accuracy (score chosen > rejected), mean
    margin, mean chosen and rejected scores, pairs."""
    from llmctl.train.batches import as_tensors

    model.eval()
    right, n, margin, sc_sum, sr_sum = 0, 0, 0.0, 0.0, 0.0
    for b in batches:
        t = as_tensors(b)
        s = last_scores(model, t["tokens"].to(device), t["lengths"].to(device)).double().cpu()
        B = len(t["index"])
        sc, sr = s[:B], s[B:]
        right += int((sc > sr).sum())
        n += B
        margin += float((sc - sr).sum())
        sc_sum += float(sc.sum())
        sr_sum += float(sr.sum())
    return {"accuracy": right / n, "margin": margin / n, "chosen_score": sc_sum / n,
            "rejected_score": sr_sum / n, "pairs": n}  # fmt: skip
