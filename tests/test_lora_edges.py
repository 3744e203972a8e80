"""model/lora.py at its edges: defaults, the layers it refuses (with their names in the
message), settings across layers, target names, and how a LoRA layer prints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmctl.model.gpt import GPT, preset
from llmctl.model.lora import (
    add_lora,
    apply_lora,
    describe_lora,
    lora_settings,
    merge_lora,
    resolve_targets,
)


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", vocab_size=32, max_seq_len=16))


def test_defaults_are_rank_8_alpha_16_on_attention() -> None:
    m = gpt()
    apply_lora(m)
    assert lora_settings(m) == {"r": 8, "alpha": 16.0, "rslora": False}
    adapted = {n.rsplit(".", 1)[-1] for n, x in m.named_modules() if hasattr(x, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_settings_must_be_one_across_layers() -> None:
    with pytest.raises(ValueError, match="found none"):
        lora_settings(gpt())
    m = gpt()
    apply_lora(m, targets="q_proj", r=2)
    apply_lora(m, targets="v_proj", r=4)
    with pytest.raises(ValueError, match=r"expected one LoRA setting across layers, found \["):
        lora_settings(m)


class HalfLinear(nn.Module):
    """Has in_features but no out_features: not Linear-like."""

    in_features = 4


def test_only_linear_like_layers_are_adapted_and_errors_name_the_layer() -> None:
    with pytest.raises(ValueError, match="emb: Embedding is not a Linear layer; LoRA needs one"):
        add_lora(nn.Embedding(4, 4), 2, 4.0, name="emb")
    with pytest.raises(ValueError, match="half: HalfLinear is not a Linear layer"):
        add_lora(HalfLinear(), 2, 4.0, name="half")
    lin = add_lora(nn.Linear(4, 3), 2, 4.0, name="lin")
    with pytest.raises(ValueError, match="lin: already has a LoRA adapter"):
        add_lora(lin, 2, 4.0, name="lin")
    m = gpt()
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_proj: already has"):
        apply_lora(m, targets="q_proj")
        apply_lora(m, targets="q_proj")


def test_unknown_targets_are_refused_with_the_known_names() -> None:
    with pytest.raises(ValueError, match=r"'qproj' is not one of attn, mlp, all, q_proj, k_proj"):
        resolve_targets("qproj")
    assert resolve_targets("mlp, q_proj") == (
        ("q_proj", "gate_proj", "up_proj", "down_proj"), frozenset({"q_proj"})
    )  # fmt: skip


def test_a_lora_layer_prints_its_rank_alpha_and_rslora() -> None:
    plain = add_lora(nn.Linear(4, 3), 2, 4.0)
    first = repr(plain).splitlines()[1].strip()
    assert first == "in_features=4, out_features=3, bias=True, lora r=2, alpha=4"
    rs = add_lora(nn.Linear(4, 3), 2, 4.0, rslora=True)
    assert repr(rs).splitlines()[1].strip().endswith("lora r=2, alpha=4, rslora")
    assert rs.scaling == pytest.approx(4.0 / 2**0.5) and plain.scaling == 2.0


class Bare(nn.Module):
    """Linear-like without parameters or buffers (its weight lives elsewhere)."""

    in_features, out_features = 4, 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :3]


def test_a_layer_without_tensors_gets_its_adapter_on_the_cpu() -> None:
    layer = add_lora(Bare(), 2, 4.0)
    assert layer.lora_A.weight.device == torch.device("cpu")
    assert layer(torch.ones(1, 4)).shape == (1, 3)


def test_describe_and_merge_leave_nothing_behind() -> None:
    m = gpt()
    apply_lora(m, targets="q_proj", r=2, alpha=4.0)  # no dropout: an Identity, no `p`
    block = describe_lora(m)
    assert block == {"r": 2, "alpha": 4.0, "rslora": False, "dropout": 0.0,
                     "modules": ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]}  # fmt: skip
    merge_lora(m)
    q = m.blocks[0].attn.q_proj
    assert type(q) is nn.Linear and describe_lora(m) is None
    assert not {"r", "lora_alpha", "rslora", "scaling", "disabled"} & set(vars(q))


def test_a_dropout_outside_0_1_is_refused_with_its_value() -> None:
    with pytest.raises(ValueError, match=r"LoRA dropout must be in \[0, 1\), got 1.0"):
        add_lora(nn.Linear(4, 4), 2, 4.0, dropout=1.0)


def test_groups_are_the_model_types_own() -> None:
    from llmctl.model.rwkv import RWKV
    from llmctl.model.rwkv import preset as rwkv_preset

    torch.manual_seed(0)
    m = RWKV(rwkv_preset("rwkv-tiny", vocab_size=40))
    adapted = apply_lora(m, "attn", r=2)
    assert adapted and all(n.rsplit(".", 2)[-2] == "att" for n in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {"key", "value", "receptance", "output"}


def test_rebuild_restores_the_dropout() -> None:
    from llmctl.model.lora import rebuild_lora

    m = gpt()
    apply_lora(m, r=2, dropout=0.25)
    block = describe_lora(m)
    assert block is not None and block["dropout"] == 0.25
    fresh = gpt()
    rebuild_lora(fresh, block)
    layer = dict(fresh.named_modules())[block["modules"][0]]
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.25
