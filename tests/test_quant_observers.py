"""model/quant.py pinned exactly: calibration observers (minmax keeps the largest |x|,
percentile averages each batch's k-th smallest |x|, k = ceil(n · p / 100)), int4 codes at the
edge of the grid, int4 group sizes, Int4Linear's bias and dtype, the config.json block."""

from __future__ import annotations

import math

import pytest
import torch

from llmctl.model.quant import Int4Linear, Observer, QuantSpec, int4_codes, int4_group


def test_minmax_keeps_the_largest_magnitude() -> None:
    o = Observer("minmax")
    o.update(torch.tensor([1.0, -3.0]))
    o.update(torch.tensor([2.0, 0.5]))
    assert o.value == 3.0 and o.batches == 2 and o.scale() == pytest.approx(3.0 / 127)


def test_percentile_is_the_mean_of_each_batches_kth_value() -> None:
    o = Observer("percentile", percentile=50.0)
    o.update(torch.arange(1.0, 11.0))  # k = ceil(10 · 0.5) = 5: the 5th smallest is 5
    assert o.value == 5.0
    o.update(-torch.arange(1.0, 101.0))  # |x|: k = 50 -> 50
    o.update(torch.full((3,), 2.0))  # k = 2 -> 2
    assert o.value == pytest.approx((5.0 + 50.0 + 2.0) / 3) and o.batches == 3
    p = Observer("percentile", percentile=99.0)
    p.update(torch.arange(1.0, 201.0))  # k = ceil(200 · 0.99) = 198
    assert p.value == 198.0
    q = Observer("percentile", percentile=0.0)
    q.update(torch.tensor([4.0, 9.0]))  # k is at least 1: the smallest
    assert q.value == 4.0
    assert math.isclose(Observer("minmax").scale(), Observer().scale())  # all-zero: a floor
    assert Observer().scale() > 0


def test_int4_codes_clamp_a_rounded_up_zero_point_grid() -> None:
    """-7.5 and 7.5 on a grid of scale 1 and zero 8: 7.5 rounds to 8, and 8 + 8 = 16 is past
    the nibble: it is clamped to 15 (symmetric: to 7 + 8)."""
    w = torch.tensor([[-7.5, 7.5, 0.0, 3.0]])
    scale = torch.tensor([[1.0, 1.0]])
    assert int4_codes(w, scale, torch.tensor([[8, 8]]), 2).tolist() == [[0, 15, 8, 11]]
    assert int4_codes(w, scale, None, 2).tolist() == [[0, 15, 8, 11]]
    assert int4_codes(torch.tensor([[-9.0, 9.0]]), torch.tensor([[1.0]]), None, 2).tolist() == [
        [0, 15]
    ]  # fmt: skip


def test_int4_group_sizes() -> None:
    assert int4_group(256, 128) == 128
    assert int4_group(96, 64) == 48  # the largest even divisor >= 32
    assert int4_group(70, 64) == 70  # 14 < 32: the whole row
    assert int4_group(7, 2) == 7  # odd: no even divisor
    assert int4_group(9, 4) == 9


def test_int4_linear_keeps_bias_and_the_input_dtype() -> None:
    torch.manual_seed(0)
    w, b = torch.randn(6, 8), torch.randn(6)
    m = Int4Linear.from_weight(w, b, 4, zero_point=True)
    assert m.bias is not None and torch.equal(m.bias.float(), b)
    assert Int4Linear.from_weight(w, None, 4, zero_point=True).bias is None
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)  # the F.linear path
    y = m(x)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 6)


def test_the_config_block_names_its_modules_and_the_weight_only_method() -> None:
    block = QuantSpec(method="qat", bits=4).block(["blocks.0.attn.q_proj"])
    assert block["modules"] == ["blocks.0.attn.q_proj"] and block["method"] == "int4"
    assert "bits" not in block and QuantSpec.from_block(block).method == "int4"
