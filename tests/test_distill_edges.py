"""train/distill.py at its edges: the objective's total is exactly alpha·T²·KL + (1−alpha)·CE
(T ≠ 1, alpha at 0 and 1), the settings' bounds, feature distances per position, layer pairs
at the edge of the models, and the models the objective refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmctl.errors import UsageError
from llmctl.model.gpt import GPT, preset
from llmctl.train.distill import FeatureDistill, LogitDistill, divergence, feature_loss

pytestmark = pytest.mark.usefixtures("one_thread")

V = 40


def gpt(seed: int, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset("tiny", vocab_size=V, max_seq_len=32, **kw))


def batch() -> dict[str, torch.Tensor]:
    return {"tokens": torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))}


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_total_is_alpha_t_squared_kl_plus_the_rest_cross_entropy(alpha: float) -> None:
    student, teacher = gpt(0), gpt(1)
    obj = LogitDistill(teacher, temperature=2.0, alpha=alpha)
    out = obj(student, batch(), None)
    tokens = batch()["tokens"]
    s, t = student(tokens[:, :-1]), teacher(tokens[:, :-1])
    kl = divergence(s.reshape(-1, V), t.reshape(-1, V), temperature=2.0).sum()
    ce = F.cross_entropy(s.reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(out.total, alpha * 4.0 * kl + (1 - alpha) * ce)
    torch.testing.assert_close(out.metrics["kl"][0], kl)
    torch.testing.assert_close(out.metrics["ce"][0], ce)
    assert int(out.count) == 16 and out.tokens == 16


@pytest.mark.parametrize(
    ("key", "value"),
    [("alpha", -0.1), ("alpha", 1.01), ("temperature", 0.0), ("beta", 1.5), ("top_k", -1)],
)
def test_settings_out_of_range_are_refused(key: str, value: float) -> None:
    with pytest.raises(UsageError, match=f"config key '{key}': must be"):
        LogitDistill(gpt(1), **{key: value})


def test_settings_at_their_bounds_are_accepted() -> None:
    for kw in ({"alpha": 0.0}, {"alpha": 1.0}, {"beta": 0.0}, {"beta": 1.0}, {"top_k": 0}):
        LogitDistill(gpt(1), **kw)


def test_feature_distances_are_per_position() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mse = feature_loss(s, t, "mse")
    assert mse.shape == (2, 3)
    torch.testing.assert_close(mse, ((s - t) ** 2).mean(-1))
    cos = feature_loss(s, t, "cosine")
    torch.testing.assert_close(cos, 1 - F.cosine_similarity(s, t, dim=-1))
    with pytest.raises(ValueError, match="mse or cosine"):
        feature_loss(s, t, "l1")


def test_layer_pairs_must_lie_inside_both_models() -> None:
    student, teacher = gpt(0), gpt(1, n_layer=3)
    L_s = student.config.n_layer
    FeatureDistill(teacher, pairs=[(L_s - 1, 2)]).attach(student)  # the last layers: fine
    for pair in [(L_s, 0), (0, 3), (-1, 0), (0, -1)]:
        with pytest.raises(UsageError, match="outside the student's"):
            FeatureDistill(teacher, pairs=[pair]).attach(student)


def test_distillation_refuses_bidirectional_or_mismatched_models() -> None:
    with pytest.raises(UsageError, match="causal student and teacher"):
        LogitDistill(gpt(1)).check(gpt(0, causal=False))
    with pytest.raises(UsageError, match="causal student and teacher"):
        LogitDistill(gpt(1, causal=False)).check(gpt(0))
    torch.manual_seed(2)
    other = GPT(preset("tiny", vocab_size=V + 1, max_seq_len=32))
    with pytest.raises(UsageError, match="one vocabulary"):
        LogitDistill(other).check(gpt(0))
    LogitDistill(gpt(1)).check(gpt(0))
