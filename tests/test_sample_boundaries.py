"""top-k, top-p and min-p equal transformers' warpers exactly, including on logits whose ties
fall exactly on the boundary (equal logits give exact float probabilities, k/V, so a
cumulative sum can equal 1 - p to the bit: `<=` and `<` then keep different sets)."""

from __future__ import annotations

import pytest
import torch

from llmctl.model.sample import min_p_filter, top_k_filter, top_p_filter

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    MinPLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]


def tied_rows() -> torch.Tensor:
    """Rows with ties: all equal (probabilities exactly 1/8), two tied blocks, a -inf tail."""
    return torch.tensor(
        [
            [0.0] * 8,
            [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0],
            [2.0, 2.0, 0.0, 0.0, 0.0, 0.0, float("-inf"), float("-inf")],
            [0.0, 0.0, 0.0, 0.0, float("-inf"), float("-inf"), float("-inf"), float("-inf")],
        ]
    )


@pytest.mark.parametrize("p", [0.125, 0.25, 0.5, 0.625, 0.75, 0.875, 0.3, 0.9, 0.99])
def test_top_p_equals_transformers_on_ties_at_the_boundary(p: float) -> None:
    x = tied_rows()
    assert torch.equal(top_p_filter(x, p), TopPLogitsWarper(p)(None, x.clone()))


def test_top_p_keeps_the_token_whose_probability_reaches_p_exactly() -> None:
    """8 equal tokens: the cumulative sums are exactly k/8. At p = 0.75 the 6th token brings the
    kept mass to exactly 0.75, so 6 stay (the 2 whose sum is exactly 1 - p = 0.25 go)."""
    x = torch.zeros(1, 8)
    assert len(kept(top_p_filter(x, 0.75))[0]) == 6
    assert len(kept(top_p_filter(x, 0.5))[0]) == 4
    assert len(kept(top_p_filter(x, 0.125))[0]) == 1
    assert len(kept(top_p_filter(x, 0.126))[0]) == 2
    assert kept(top_p_filter(x, 1.0)) == [list(range(8))]  # p = 1: everything, untouched
    assert top_p_filter(x, 1.0) is x


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 8, 9])
def test_top_k_equals_transformers_on_ties_at_the_boundary(k: int) -> None:
    x = tied_rows()
    assert torch.equal(top_k_filter(x, k), TopKLogitsWarper(k)(None, x.clone()))


def test_top_k_keeps_every_token_tied_with_the_kth() -> None:
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 2.0, 0.0]])
    assert kept(top_k_filter(x, 3)) == [[0, 2, 3, 4]]  # the 3rd best (2.0) is tied: both stay
    assert kept(top_k_filter(x, 2)) == [[0, 2]]
    assert kept(top_k_filter(x, 6)) == [list(range(6))]
    assert top_k_filter(x, 6) is x and top_k_filter(x, 0) is x and top_k_filter(x, -1) is x


@pytest.mark.parametrize("min_p", [0.05, 0.25, 0.5, 0.9, 1.0])
def test_min_p_equals_transformers_on_ties_at_the_boundary(min_p: float) -> None:
    x = tied_rows()
    assert torch.equal(min_p_filter(x, min_p), MinPLogitsWarper(min_p)(None, x.clone()))


def test_min_p_keeps_tokens_exactly_at_the_threshold() -> None:
    """4 equal tokens and min_p = 1: each has exactly the top probability, so all stay; a
    token just below goes."""
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0, -1e-3]])
    assert kept(min_p_filter(x, 1.0)) == [[0, 1, 2, 3]]
    assert kept(min_p_filter(x, 0.0)) == [list(range(5))]
    assert min_p_filter(x, 0.0) is x
    # the most likely token always stays, also when min_p would drop it (rounding)
    y = torch.tensor([[5.0, -5.0]])
    assert kept(min_p_filter(y, 1.0)) == [[0]]


def test_warpers_agree_on_random_logits_with_many_ties() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3, 3, (64, 12), generator=g).float()  # integers: ties everywhere
    for p in (0.1, 0.3, 0.5, 0.7, 0.9):
        assert torch.equal(top_p_filter(x, p), TopPLogitsWarper(p)(None, x.clone()))
        assert torch.equal(min_p_filter(x, p), MinPLogitsWarper(p)(None, x.clone()))
    for k in (1, 2, 3, 6, 11):
        assert torch.equal(top_k_filter(x, k), TopKLogitsWarper(k)(None, x.clone()))
