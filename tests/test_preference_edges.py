"""Preference objectives' edges the mutation check found untested: each method's branch (DPO
vs IPO, SimPO vs ORPO) and metrics against the closed forms, the uncached reference, KTO's
parts, the KL probe's mean against a hand computation, the reward model's figures."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from llmctl.errors import UsageError
from llmctl.model.gpt import GPT, GPTConfig
from llmctl.train.preference import (
    KTOObjective,
    PairObjective,
    RewardObjective,
    dpo_loss,
    frozen,
    ipo_loss,
    kl_probe,
    kto_loss,
    kto_reference_point,
    last_scores,
    orpo_loss,
    pairwise_accuracy,
    reference_logps,
    sequence_logps,
    simpo_loss,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = dict(vocab_size=32, n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=16)
# two pairs: rows [chosen 0, chosen 1, rejected 0, rejected 1]
TOKENS = torch.tensor([[1, 2, 3, 4, 5], [1, 6, 7, 8, 0], [1, 2, 9, 10, 11], [1, 6, 12, 0, 0]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])


def _lm(seed: int = 0, **kw: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CFG, **kw}))  # type: ignore[arg-type]


def _own() -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return sequence_logps(_lm(), TOKENS, MASK)


REF = torch.tensor([-9.0, -8.0, -10.0, -6.0])


def _metric(out, name: str) -> float:  # type: ignore[no-untyped-def]
    s, n = out.metrics[name]
    return s.item() / n.item()


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo"])
def test_pair_methods_equal_their_closed_forms(method: str) -> None:
    obj = PairObjective(method, beta=0.3, label_smoothing=0.1, simpo_gamma=0.7, orpo_lambda=0.2)
    out = obj(_lm(), {"tokens": TOKENS, "loss_mask": MASK, "ref": REF}, torch.Generator())
    logp, n = _own()
    mean, rn = logp / n, REF / n
    if method == "dpo":
        want = dpo_loss(logp[:2], logp[2:], REF[:2], REF[2:], beta=0.3, label_smoothing=0.1)
        own_c, own_r = logp[:2], logp[2:]
        rc, rr = 0.3 * (logp[:2] - REF[:2]), 0.3 * (logp[2:] - REF[2:])
    elif method == "ipo":
        want = ipo_loss(mean[:2], mean[2:], rn[:2], rn[2:], beta=0.3)
        own_c, own_r = mean[:2], mean[2:]
        rc, rr = 0.3 * (mean[:2] - rn[:2]), 0.3 * (mean[2:] - rn[2:])
    elif method == "simpo":
        want = simpo_loss(mean[:2], mean[2:], beta=0.3, gamma=0.7, label_smoothing=0.1)
        own_c, own_r = mean[:2], mean[2:]
        rc, rr = 0.3 * mean[:2], 0.3 * mean[2:]
    else:
        want = orpo_loss(mean[:2], mean[2:], -mean[:2], lam=0.2)
        own_c, own_r = mean[:2], mean[2:]
        rc, rr = 0.3 * mean[:2], 0.3 * mean[2:]
    assert out.total.item() == pytest.approx(want.sum().item(), rel=1e-5)
    assert out.count.item() == 2 and out.tokens == TOKENS.numel()
    assert obj.needs_reference == (method in ("dpo", "ipo"))
    assert _metric(out, "accuracy") == (own_c > own_r).float().mean().item()
    assert _metric(out, "reward_accuracy") == (rc > rr).float().mean().item()
    assert _metric(out, "margin") == pytest.approx((rc - rr).mean().item(), rel=1e-5)
    assert _metric(out, "reward_chosen") == pytest.approx(rc.mean().item(), rel=1e-5)
    assert _metric(out, "reward_rejected") == pytest.approx(rr.mean().item(), rel=1e-5)
    assert _metric(out, "chosen_logp") == pytest.approx(logp[:2].mean().item(), rel=1e-5)
    assert _metric(out, "rejected_logp") == pytest.approx(logp[2:].mean().item(), rel=1e-5)
    assert out.metrics["accuracy"][1].item() == 2


def test_the_dpo_and_ipo_branches_differ() -> None:
    batch = {"tokens": TOKENS, "loss_mask": MASK, "ref": REF}
    totals = {m: PairObjective(m, beta=0.3)(_lm(), batch, torch.Generator()).total.item()
              for m in ("dpo", "ipo", "simpo", "orpo")}  # fmt: skip
    assert len({round(v, 6) for v in totals.values()}) == 4


def test_uncached_reference_and_its_absence() -> None:
    ref_model = _lm(seed=1)
    calls = []

    def reference(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        calls.append(tokens.shape)
        with torch.no_grad():
            return sequence_logps(ref_model, tokens, mask)[0]

    obj = PairObjective("dpo", beta=0.3, reference=reference)
    out = obj(_lm(), {"tokens": TOKENS, "loss_mask": MASK}, torch.Generator())
    ref = sequence_logps(ref_model, TOKENS, MASK)[0].detach()
    cached_batch = {"tokens": TOKENS, "loss_mask": MASK, "ref": ref.double()}
    cached = PairObjective("dpo", beta=0.3)(_lm(), cached_batch, torch.Generator())
    assert calls == [TOKENS.shape]
    assert out.total.item() == pytest.approx(cached.total.item(), rel=1e-6)
    with pytest.raises(UsageError, match="no cached reference"):
        PairObjective("dpo")(_lm(), {"tokens": TOKENS, "loss_mask": MASK}, torch.Generator())
    with pytest.raises(UsageError, match="unknown method"):
        PairObjective("kto")


def test_checks_refuse_reward_and_bidirectional_models() -> None:
    PairObjective("dpo").check(_lm())
    KTOObjective().check(_lm())
    with pytest.raises(UsageError, match="reward model"):
        PairObjective("dpo").check(_lm(head="score"))
    with pytest.raises(UsageError, match="reward model"):
        KTOObjective().check(_lm(head="score"))
    with pytest.raises(UsageError, match="causal"):
        PairObjective("simpo").check(_lm(causal=False))
    RewardObjective().check(_lm(head="score"))
    with pytest.raises(UsageError, match="head = score"):
        RewardObjective().check(_lm())


def test_kto_parts_and_reference_point() -> None:
    label = torch.tensor([1.0, 0.0])
    ref = torch.tensor([-9.0, -8.0, -30.0, -20.0])
    obj = KTOObjective(beta=0.5, desirable_weight=1.5, undesirable_weight=0.5)
    out = obj(_lm(), {"tokens": TOKENS, "loss_mask": MASK, "ref": ref, "label": label},
              torch.Generator())  # fmt: skip
    logp, _ = _own()
    z = kto_reference_point(logp[2:], ref[2:])
    assert z.item() == pytest.approx(((logp[2:] - ref[2:]).mean()).item(), rel=1e-5) and z > 0
    want = kto_loss(logp[:2], ref[:2], label, z, beta=0.5, desirable_weight=1.5,
                    undesirable_weight=0.5)  # fmt: skip
    assert out.total.item() == pytest.approx(want.sum().item(), rel=1e-5)
    reward = 0.5 * (logp[:2] - ref[:2])
    assert out.metrics["reward_chosen"][0].item() == pytest.approx(reward[0].item(), rel=1e-5)
    assert out.metrics["reward_chosen"][1].item() == 1
    assert out.metrics["reward_rejected"][0].item() == pytest.approx(reward[1].item(), rel=1e-5)
    assert out.metrics["chosen_logp"][0].item() == pytest.approx(logp[0].item(), rel=1e-5)
    assert out.metrics["rejected_logp"][0].item() == pytest.approx(logp[1].item(), rel=1e-5)
    assert out.metrics["kl"][0].item() == pytest.approx(z.item(), rel=1e-6)
    assert out.metrics["kl"][1].item() == 1
    acc = ((reward[0] > 0).float() + (reward[1] < 0).float()).item() / 2
    assert _metric(out, "accuracy") == acc
    assert out.count.item() == 2
    assert kto_reference_point(torch.tensor([-5.0]), torch.tensor([-1.0])).item() == 0.0


def _reward_batch() -> dict[str, torch.Tensor]:
    return {"tokens": TOKENS, "lengths": torch.tensor([5, 4, 5, 3]),
            "index": torch.tensor([0, 1])}  # fmt: skip


def test_reward_objective_and_pairwise_accuracy() -> None:
    rm = _lm(head="score")
    b = _reward_batch()
    out = RewardObjective()(rm, b, torch.Generator())
    with torch.no_grad():
        s = rm(TOKENS)[..., 0]
    s = torch.stack([s[0, 4], s[1, 3], s[2, 4], s[3, 2]])
    assert last_scores(rm, TOKENS, b["lengths"]).tolist() == pytest.approx(s.tolist())
    assert out.total.item() == pytest.approx((-F.logsigmoid(s[:2] - s[2:])).sum().item(), rel=1e-5)
    assert _metric(out, "margin") == pytest.approx((s[:2] - s[2:]).mean().item(), rel=1e-5)
    assert _metric(out, "reward_chosen") == pytest.approx(s[:2].mean().item(), rel=1e-5)
    assert _metric(out, "reward_rejected") == pytest.approx(s[2:].mean().item(), rel=1e-5)
    assert _metric(out, "accuracy") == (s[:2] > s[2:]).float().mean().item()
    assert out.count.item() == 2
    figs = pairwise_accuracy(rm, [b, b], device=torch.device("cpu"))
    assert figs["pairs"] == 4
    assert figs["accuracy"] == (s[:2] > s[2:]).float().mean().item()
    assert figs["margin"] == pytest.approx((s[:2] - s[2:]).mean().item(), rel=1e-5)
    assert figs["chosen_score"] == pytest.approx(s[:2].mean().item(), rel=1e-5)
    assert figs["rejected_score"] == pytest.approx(s[2:].mean().item(), rel=1e-5)


def test_reference_logps_fills_rows_by_index_and_restores_train_mode() -> None:
    model = _lm()
    model.train()
    b = {"tokens": TOKENS, "loss_mask": MASK, "index": torch.tensor([2, 0])}
    out = reference_logps(model, [b], 3, device=torch.device("cpu"), precision="fp32")
    assert model.training
    logp, _ = _own()
    assert out[2].tolist() == pytest.approx([logp[0].item(), logp[2].item()], rel=1e-6)
    assert out[0].tolist() == pytest.approx([logp[1].item(), logp[3].item()], rel=1e-6)
    assert math.isnan(out[1, 0].item()) and math.isnan(out[1, 1].item())
    model.eval()
    reference_logps(model, [b], 3, device=torch.device("cpu"), precision="fp32")
    assert not model.training


def test_kl_probe_is_the_mean_per_token_kl_over_chosen_answers() -> None:
    model, ref = _lm(seed=0), _lm(seed=1)
    b = {"tokens": TOKENS, "loss_mask": MASK, "index": torch.tensor([0, 1])}
    probe = kl_probe(model, lambda: [b, b], frozen(ref))
    got = probe(model, 0)["val_kl"]
    with torch.no_grad():
        lp = F.log_softmax(model(TOKENS[:2, :-1]), -1)
        lq = F.log_softmax(ref(TOKENS[:2, :-1]), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    m = MASK[:2, 1:].float()
    assert got == pytest.approx(((kl * m).sum() / m.sum()).item(), rel=1e-5)
    assert got > 0
    assert kl_probe(model, lambda: [b], frozen(copy.deepcopy(model)))(model, 0)["val_kl"] == (
        pytest.approx(0.0, abs=1e-6)
    )
    assert math.isnan(kl_probe(model, lambda: [], frozen(ref))(model, 0)["val_kl"])


def test_a_config_without_head_or_causal_counts_as_a_causal_lm() -> None:
    class Bare(torch.nn.Module):
        config = type("Cfg", (), {})()  # e.g. a model type whose config predates `head`

    PairObjective("dpo").check(Bare())
    KTOObjective().check(Bare())


def test_a_tie_is_not_a_preference() -> None:
    tokens = torch.cat([TOKENS[:2], TOKENS[:1], TOKENS[3:]])  # pair 0: chosen == rejected
    mask = torch.cat([MASK[:2], MASK[:1], MASK[3:]])
    out = PairObjective("simpo")(_lm(), {"tokens": tokens, "loss_mask": mask}, torch.Generator())
    logp, n = sequence_logps(_lm(), tokens, mask)
    want = float(logp[1] / n[1] > logp[3] / n[3])  # pair 0 ties: never counted right
    assert out.metrics["accuracy"][0].item() == want


def test_kto_uncached_reference_and_an_undesirable_item_with_a_small_positive_reward() -> None:
    logp, _ = _own()
    ref_vals = logp.detach().clone()
    ref_vals[1] -= 1.0  # undesirable item: reward β·(π − ρ) = 0.5 > 0 (wrongly preferred)
    ref_vals[0] -= 1.0  # desirable item: reward 0.5 > 0 (right)

    def reference(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return ref_vals

    label = torch.tensor([1.0, 0.0])
    batch = {"tokens": TOKENS, "loss_mask": MASK, "label": label}
    out = KTOObjective(beta=0.5, reference=reference)(_lm(), batch, torch.Generator())
    cached = KTOObjective(beta=0.5)(_lm(), {**batch, "ref": ref_vals}, torch.Generator())
    assert out.total.item() == pytest.approx(cached.total.item(), rel=1e-6)
    assert _metric(out, "accuracy") == 0.5
    with pytest.raises(UsageError, match="no cached reference"):
        KTOObjective()(_lm(), batch, torch.Generator())
