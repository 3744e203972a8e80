"""Online RL edges the mutation check found untested: GRPO and PPO read a batch's `old_logp`
(ppo_epochs > 1), `whiten`'s population variance, the metrics' exact values, k3/GAE/shaped
rewards on numbers worked by hand."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.errors import UsageError
from llmctl.model.gpt import GPT, GPTConfig
from llmctl.train.online import (
    GRPO,
    PPO,
    OnlineConfig,
    attach_value_head,
    gae,
    group_advantages,
    grpo_loss,
    k3_kl,
    kl_shaped_rewards,
    ppo_loss,
    token_logprobs,
    value_loss,
    whiten,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_lm(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=16))


TOKENS = torch.tensor([[1, 2, 3, 4, 5, 0], [1, 2, 6, 7, 0, 0]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]])


def _batch() -> dict[str, torch.Tensor]:
    return {"tokens": TOKENS, "mask": MASK, "ref_logp": torch.full((2, 5), -3.0),
            "adv": torch.tensor([1.0, -0.5]), "rewards": torch.tensor([1.0, 0.5]),
            "capped": torch.tensor([1.0, 0.0])}  # fmt: skip


def test_whiten_uses_the_masked_population_variance() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    got = whiten(x, mask, eps=0.0)
    s = math.sqrt(2 / 3)  # population std of (1, 2, 3)
    assert got.tolist()[0] == pytest.approx([-1 / s, 0.0, 1 / s, 0.0], rel=1e-6)
    shifted = whiten(x + 10.0, mask, eps=0.0)  # shift-invariant: the variance is about the mean
    assert torch.allclose(shifted, got, atol=1e-6)
    assert whiten(torch.tensor([[5.0]]), torch.tensor([[1]]), eps=1.0).item() == 0.0


def test_grpo_reads_the_batch_old_logp() -> None:
    model = _tiny_lm()
    batch = _batch()
    logp = token_logprobs(model(TOKENS[:, :-1]), TOKENS[:, 1:]).detach()
    old = logp - 0.5  # ρ = e^0.5 > 1 + ε on every token: the clip binds (counted in the mask)
    out = GRPO(clip_eps=0.2, beta=0.1)(model, {**batch, "old_logp": old}, torch.Generator())
    want, _ = grpo_loss(logp, old, batch["ref_logp"], batch["adv"], MASK, clip_eps=0.2, beta=0.1)
    assert out.total.item() == pytest.approx(want.item(), rel=1e-6)
    same, _ = grpo_loss(logp, logp, batch["ref_logp"], batch["adv"], MASK, clip_eps=0.2, beta=0.1)
    assert abs(want.item() - same.item()) > 0.1
    # clipped on the first response (A > 0, ρ > 1 + ε), not on the second (A < 0): 3 of 6 tokens
    assert out.metrics["clip_frac"][0].item() == 3
    assert out.metrics["clip_frac"][1].item() == 6
    assert out.metrics["reward"][0].item() == 1.5
    assert out.metrics["capped"][0].item() == 1.0
    assert out.metrics["response_len"][1].item() == 2
    assert out.count.item() == 2
    assert out.tokens == TOKENS.numel()
    kl = k3_kl(logp, batch["ref_logp"])
    m = MASK.float()
    want_kl = ((kl * m).sum(1) / m.sum(1)).sum().item()
    assert out.metrics["kl"][0].item() == pytest.approx(want_kl, rel=1e-6)


def test_ppo_reads_the_batch_old_logp_and_reports_the_value_loss() -> None:
    model = _tiny_lm()
    attach_value_head(model)
    logp = token_logprobs(model(TOKENS[:, :-1]), TOKENS[:, 1:]).detach()
    old = logp - 0.5 * MASK
    adv = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0], [0.0, -1.0, -1.0, -1.0, 0.0]])
    old_v = torch.full((2, 5), 0.5)
    returns = torch.full((2, 5), 1.0)
    batch = {**_batch(), "adv": adv, "values": old_v, "returns": returns, "old_logp": old}
    out = PPO(clip_eps=0.2, vf_coef=0.5, vf_clip=0.2)(model, batch, torch.Generator())
    zero = torch.zeros(2, 5)  # the zero-initialized head: V = 0
    want, count = ppo_loss(logp, old, adv, zero, old_v, returns, MASK, clip_eps=0.2,
                           vf_coef=0.5, vf_clip=0.2)  # fmt: skip
    assert out.total.item() == pytest.approx(want.item(), rel=1e-6)
    assert out.count.item() == count.item() == 6
    # V = 0, V_old = 0.5, clip 0.2 → clipped V = 0.3: ½·max(1, 0.49) = 0.5 per token
    assert out.metrics["value_loss"][0].item() == pytest.approx(3.0)
    assert out.metrics["value_loss"][1].item() == 6
    assert out.metrics["clip_frac"][0].item() == 3


def test_ppo_needs_a_value_head_and_a_language_model() -> None:
    model = _tiny_lm()
    with pytest.raises(UsageError, match="value head"):
        PPO().check(model)
    attach_value_head(model)
    PPO().check(model)
    GRPO().check(model)
    torch.manual_seed(0)
    rm = GPT(GPTConfig(vocab_size=32, n_layer=1, n_head=2, d_model=16, d_ff=32, max_seq_len=16,
                       head="score"))  # fmt: skip
    with pytest.raises(UsageError, match=r"reward model \(head='score'\)"):
        GRPO().check(rm)


def test_attach_value_head_starts_at_zero() -> None:
    model = _tiny_lm()
    head = attach_value_head(model)
    assert model.aux["value"] is head
    assert head.weight.shape == (1, 16) and head.bias is not None
    assert head.weight.abs().sum().item() == 0 and head.bias.item() == 0


def test_closed_forms_by_hand() -> None:
    assert group_advantages(torch.tensor([3.0, 5.0]), 1).tolist() == [0.0, 0.0]
    assert k3_kl(torch.tensor([0.0]), torch.tensor([math.log(2)])).item() == pytest.approx(
        2 - math.log(2) - 1
    )
    score = torch.tensor([2.0])
    old, ref = torch.tensor([[0.0, -1.0, -2.0, 0.0]]), torch.tensor([[0.0, -1.5, -1.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0]])
    r = kl_shaped_rewards(score, old, ref, mask, kl_coef=0.1)
    assert r.tolist()[0] == pytest.approx([0.0, -0.05, 0.1 + 2.0, 0.0])
    rewards = torch.tensor([[0.0, 1.0, 2.0, 5.0]])
    values = torch.tensor([[9.0, 0.5, 1.0, 9.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 2.0 - 1.0  # last token: no next value
    d1 = 1.0 + 0.9 * 1.0 - 0.5
    assert adv.tolist()[0] == pytest.approx([0.0, d1 + 0.45 * d2, d2, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.0, d1 + 0.45 * d2 + 0.5, d2 + 1.0, 0.0])
    v = value_loss(torch.tensor([0.0]), torch.tensor([0.5]), torch.tensor([1.0]), 0.2)
    assert v.item() == pytest.approx(0.5)


def test_online_config_rejects_an_unknown_method() -> None:
    with pytest.raises(UsageError, match="grpo or ppo"):
        OnlineConfig(method="dpo")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("group_size", 0, "group_size"), ("ppo_epochs", 0, "ppo_epochs"), ("kl_coef", -0.1, "kl_coef"),
     ("vf_clip", -1.0, "vf_clip"), ("temperature", 0.0, "temperature"), ("top_p", 0.0, "top_p"),
     ("top_p", 1.5, "top_p"), ("gamma", 1.5, "gamma"), ("lam", -0.1, "lam")],
)  # fmt: skip
def test_online_config_bounds(key: str, value: float, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        OnlineConfig(**{key: value})
    OnlineConfig(top_p=1.0, gamma=1.0, lam=0.0, kl_coef=0.0, group_size=1)
    OnlineConfig(gamma=0.0, lam=1.0)


def test_token_logprobs_over_the_vocabulary() -> None:
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[0, 4, 2], [1, 1, 3]])
    want = [[torch.log_softmax(logits[i, t], -1)[targets[i, t]].item() for t in range(3)]
            for i in range(2)]  # fmt: skip
    assert token_logprobs(logits, targets).tolist() == [pytest.approx(w, rel=1e-6) for w in want]


def test_group_advantages_default_eps() -> None:
    s = math.sqrt(0.5)
    want = [0.5 / (s + 1e-4), -0.5 / (s + 1e-4)]
    assert group_advantages(torch.tensor([1.0, 0.0]), 2).tolist() == pytest.approx(want, rel=1e-7)


def test_a_config_without_head_counts_as_a_language_model() -> None:
    class Bare(torch.nn.Module):
        config = type("Cfg", (), {})()
        aux = torch.nn.ModuleDict({"value": torch.nn.Linear(2, 1)})

    GRPO().check(Bare())
    PPO().check(Bare())
