"""Distillation losses against their closed forms, the layer map, projections, objectives."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from llmctl.model.gpt import GPT, preset
from llmctl.model.io import load_model, save_checkpoint
from llmctl.train.distill import (
    PROJ,
    FeatureDistill,
    LogitDistill,
    divergence,
    feature_loss,
    layer_map,
)
from llmctl.train.objectives import NextToken

pytestmark = pytest.mark.usefixtures("one_thread")


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(-1)


S = np.array([[1.0, -0.5, 2.0, 0.3, -1.2], [0.0, 0.1, -0.2, 1.5, 0.7]])
T = np.array([[0.5, 0.4, 1.0, -0.3, 0.2], [2.0, -1.0, 0.0, 0.4, -0.6]])


@pytest.mark.parametrize("temp", [1.0, 2.0, 0.5])
def test_kl_and_jsd_equal_their_closed_forms(temp: float) -> None:
    s, t = torch.tensor(S), torch.tensor(T)
    ps, pt = softmax(S / temp), softmax(T / temp)
    got = lambda beta: divergence(s, t, temperature=temp, beta=beta).double().numpy()  # noqa: E731
    np.testing.assert_allclose(got(0.0), kl(pt, ps), rtol=1e-5)  # forward: KL(teacher ‖ student)
    np.testing.assert_allclose(got(1.0), kl(ps, pt), rtol=1e-5)  # reverse: KL(student ‖ teacher)
    for beta in (0.1, 0.5, 0.9):
        m = beta * pt + (1 - beta) * ps
        want = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
        np.testing.assert_allclose(got(beta), want, rtol=1e-5)
    # JSD at 0.5 is symmetric and bounded by log 2
    swapped = divergence(t, s, temperature=temp, beta=0.5).double().numpy()
    np.testing.assert_allclose(got(0.5), swapped, rtol=1e-5)
    assert (got(0.5) <= np.log(2)).all()


def test_top_k_lumps_the_tail_into_one_bucket() -> None:
    s, t = torch.tensor(S), torch.tensor(T)
    ps, pt = softmax(S), softmax(T)
    k = 2
    idx = np.argsort(-T, axis=-1)[:, :k]

    def lump(p: np.ndarray) -> np.ndarray:
        kept = np.take_along_axis(p, idx, -1)
        return np.concatenate([kept, 1 - kept.sum(-1, keepdims=True)], -1)

    for beta in (0.0, 0.5, 1.0):
        got = divergence(s, t, beta=beta, top_k=k).double().numpy()
        ls, lt = lump(ps), lump(pt)
        m = beta * lt + (1 - beta) * ls
        want = {0.0: kl(lt, ls), 1.0: kl(ls, lt)}.get(
            beta, beta * kl(lt, m) + (1 - beta) * kl(ls, m)
        )
        np.testing.assert_allclose(got, want, rtol=1e-5)
        # k = V (or more) is the full divergence
        full = divergence(s, t, beta=beta).numpy()
        np.testing.assert_allclose(divergence(s, t, beta=beta, top_k=5).numpy(), full, rtol=1e-6)


def test_divergences_are_zero_when_student_equals_teacher() -> None:
    x = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(0)) * 4
    for beta in (0.0, 0.3, 1.0):
        for k in (0, 5):
            d = divergence(x, x.clone(), temperature=1.7, beta=beta, top_k=k)
            assert d.shape == (3, 7) and d.abs().max().item() < 1e-6
    h = torch.randn(4, 16)
    assert feature_loss(h, h).abs().max() == 0
    assert feature_loss(h, 3 * h, "cosine").abs().max() < 1e-6  # cosine ignores the scale
    np.testing.assert_allclose(feature_loss(h, h + 2).numpy(), 4.0, rtol=1e-6)


def test_layer_map_is_evenly_spaced_last_meets_last() -> None:
    assert layer_map(4, 6) == [1, 2, 4, 5]
    assert layer_map(6, 6) == list(range(6))
    assert layer_map(2, 12) == [5, 11]
    assert layer_map(3, 12) == [3, 7, 11]
    assert layer_map(1, 5) == [4]


def models(d_s: int = 64, layers_s: int = 2) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    teacher = GPT(preset("tiny", vocab_size=97, n_layer=3))
    student = GPT(preset("tiny", vocab_size=97, n_layer=layers_s, d_model=d_s, n_head=4,
                         n_kv_head=2))  # fmt: skip
    return teacher, student


def batch() -> dict[str, torch.Tensor]:
    return {"tokens": torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))}


def test_logit_objective_mixes_kl_and_ce_and_is_ce_when_student_is_teacher() -> None:
    teacher, _ = models()
    student = copy.deepcopy(teacher)
    gen = torch.Generator()
    ce = NextToken()(student, batch(), gen)
    out = LogitDistill(teacher, temperature=2.0, alpha=0.3)(student, batch(), gen)
    assert out.count == ce.count == 32 and out.tokens == 32
    kl_sum, n = out.metrics["kl"]
    assert n == 32 and abs(kl_sum.item()) < 1e-4
    torch.testing.assert_close(out.metrics["ce"][0], ce.total)
    torch.testing.assert_close(out.total, 0.7 * ce.total + 0.3 * 4 * kl_sum, rtol=1e-5, atol=1e-5)
    # the teacher is frozen: no gradient reaches it; the student gets one
    _, other = models(d_s=64, layers_s=3)
    out = LogitDistill(teacher, alpha=1.0)(other, batch(), gen)
    out.total.backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert other.tok_emb.weight.grad is not None and out.metrics["kl"][0] > 0
    # a loss mask drops positions from every term
    masked = {**batch(), "loss_mask": torch.ones(2, 17, dtype=torch.long)}
    masked["loss_mask"][:, 9:] = 0
    assert LogitDistill(teacher)(other, masked, gen).count == 2 * 8


def test_feature_objective_projects_when_widths_differ_and_drops_it_at_save(
    tmp_path: Path,
) -> None:
    teacher, student = models(d_s=32)
    pairs = list(enumerate(layer_map(2, 3)))
    assert pairs == [(0, 1), (1, 2)]
    obj = FeatureDistill(teacher, pairs=pairs, loss="mse", weight=0.5)
    obj.attach(student)
    proj = student.aux[PROJ]
    assert [tuple(p.weight.shape) for p in proj] == [(64, 32), (64, 32)]
    assert student.num_params() == GPT(student.config).num_params()  # aux is not the model's
    out = obj(student, batch(), torch.Generator())
    assert set(out.metrics) == {"kl", "ce", "feature"} and out.metrics["feature"][0] > 0
    out.total.backward()
    assert all(p.grad is not None for p in proj.parameters())
    save_checkpoint(tmp_path / "ckpt", student)
    back = load_model(tmp_path / "ckpt")
    assert len(back.aux) == 0 and set(back.state_dict()) == set(GPT(student.config).state_dict())
    # same width and same weights: no projection, every term 0
    same = copy.deepcopy(teacher)
    obj = FeatureDistill(teacher, pairs=[(0, 0), (2, 2)], loss="cosine", alpha=1.0)
    obj.attach(same)
    assert PROJ not in same.aux
    out = obj(same, batch(), torch.Generator())
    assert abs(out.metrics["feature"][0].item()) < 1e-4 and abs(out.total.item()) < 1e-3


def test_answer_cache_survives_a_torn_line_and_keys_by_teacher(tmp_path: Path) -> None:
    from llmctl.data.answers import Answer, AnswerCache

    path = tmp_path / "answers.jsonl"
    cache = AnswerCache(path, {"url": "u", "model": "m"})
    cache.add(Answer(0, "hi", "hello"))
    cache.add(Answer(1, [{"role": "user", "content": "yo"}], error="http_503: busy"))
    with open(path, "a") as f:
        f.write('{"key": "torn')  # a kill in the middle of a line
    again = AnswerCache(path, {"url": "u", "model": "m"})
    assert again.get(0, "hi")["response"] == "hello" and "error" in again.get(
        1, [{"role": "user", "content": "yo"}]
    )
    assert again.get(0, "other prompt") is None and again.get(1, "hi") is None
    again.add(Answer(2, "x", "y"))
    third = AnswerCache(path, {"url": "u", "model": "m"})
    assert third.get(2, "x")["response"] == "y" and len(path.read_text().splitlines()) == 3
    assert AnswerCache(path, {"url": "u", "model": "other"}).get(0, "hi") is None
