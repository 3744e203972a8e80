"""LoRA layers (model/lora.py) and their PEFT layout on disk (model/adapter.py): exact
equalities on tiny models, and PEFT itself (a test oracle) loading what we write."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from llmctl.model.adapter import (
    grouped,
    merge_adapter,
    module_names,
    read_adapter,
    save_adapter,
)
from llmctl.model.gpt import GPT, GPTConfig, preset
from llmctl.model.lora import (
    LoRALayer,
    adapters_disabled,
    add_lora,
    apply_lora,
    lora_layers,
    merge_lora,
    trainable_params,
)

V = 61


def llama_like(seed: int = 0, **kw: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset("tiny", vocab_size=V, max_seq_len=48, **kw)).eval()


def gpt2_like(seed: int = 0, **kw: object) -> GPT:
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, max_seq_len=64,
                    norm="layernorm", mlp="gelu", pos="learned", bias=True, **kw)  # fmt: skip
    return GPT(cfg).eval()


def alibi_like(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset("tiny", vocab_size=V, max_seq_len=48, pos="alibi")).eval()


def randomize_b(model: nn.Module, seed: int = 1) -> None:
    """Give every lora_B values, as training would (an untrained B is zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.05)


def ids(model: GPT, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)


@pytest.mark.parametrize("make", [llama_like, gpt2_like, alibi_like])
def test_untrained_adapter_changes_nothing_and_only_adapters_train(make) -> None:
    base = make()
    model = copy.deepcopy(base)
    names = apply_lora(model, "attn,mlp", r=4, alpha=8, dropout=0.1)
    assert names[:4] == [f"blocks.0.attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    # names of the base's tensors are kept: a base state dict loads as it is
    assert set(base.state_dict()) < set(model.state_dict())
    extra = set(model.state_dict()) - set(base.state_dict())
    assert extra == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == extra
    model.train()  # dropout on: lora_B is zero, so the LoRA branch still adds exactly 0
    x = ids(base)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    layer = model.blocks[0].attn.q_proj
    assert isinstance(layer, LoRALayer) and isinstance(layer, nn.Linear)
    assert type(layer).__name__ == "LoRALinear"
    assert (
        layer.scaling == 2.0 and torch.count_nonzero(layer.lora_A.weight) == 4 * base.config.d_model
    )


def test_kaiming_init_and_scales_match_peft() -> None:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    torch.manual_seed(5)
    cfg = LoraConfig(r=8, lora_alpha=16)
    theirs = PeftLinear(nn.Linear(64, 48, bias=False), "default", cfg, r=8, lora_alpha=16)
    torch.manual_seed(5)
    mine = add_lora(nn.Linear(64, 48, bias=False), r=8, alpha=16)
    assert torch.equal(mine.lora_A.weight, theirs.lora_A["default"].weight)
    assert torch.equal(mine.lora_B.weight, theirs.lora_B["default"].weight)
    assert mine.scaling == theirs.scaling["default"] == 2.0
    assert add_lora(nn.Linear(4, 4), r=8, alpha=16, rslora=True).scaling == 16 / 8**0.5


@pytest.mark.parametrize("make", [llama_like, gpt2_like, alibi_like])
@pytest.mark.parametrize("rslora", [False, True])
def test_merged_equals_adapter_output(make, rslora: bool, tmp_path: Path) -> None:
    base = make(tie_embeddings=False) if make is not alibi_like else make()
    model = copy.deepcopy(base)
    targets = ["all", "lm_head"] if make is not alibi_like else ["q_proj", "v_proj", "down_proj"]
    apply_lora(model, targets, r=4, alpha=8, rslora=rslora)
    randomize_b(model)
    x = ids(base)
    with torch.no_grad():
        want = model(x)
        assert not torch.allclose(want, base(x), atol=1e-3)  # the adapter does something
        with adapters_disabled(model):
            assert torch.equal(model(x), base(x))
        save_adapter(tmp_path, model, base_digest="d" * 64, base_path="ckpt")
        merged = copy.deepcopy(base)
        changed = merge_adapter(merged, tmp_path, base_digest="d" * 64)
        assert changed == sorted(lora_layers(model))
        assert torch.allclose(merged(x), want, atol=1e-5, rtol=0)
        in_memory = copy.deepcopy(model)
        merge_lora(in_memory)
        assert not lora_layers(in_memory) and type(in_memory.lm_head) is nn.Linear
        assert torch.allclose(in_memory(x), want, atol=1e-5, rtol=0)
        a, b = in_memory.state_dict(), merged.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_peft_layout_names(tmp_path: Path) -> None:
    model = llama_like()
    apply_lora(model, "attn", r=2, alpha=4)
    cfg = save_adapter(tmp_path / "l", model, base_digest="x", base_path="ckpt")
    keys = json.loads((tmp_path / "l" / "adapter_config.json").read_text())
    assert keys == cfg and cfg["llmctl_layout"] == "llama" and cfg["fan_in_fan_out"] is False
    assert cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    from safetensors import safe_open

    with safe_open(tmp_path / "l" / "adapter_model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert len(names) == 2 * 4 * 2

    g = gpt2_like()
    apply_lora(g, ["q_proj", "v_proj", "o_proj", "down_proj"], r=2, alpha=4)
    randomize_b(g)
    cfg = save_adapter(tmp_path / "g", g, base_digest="x", base_path="ckpt")
    assert cfg["target_modules"] == ["attn.c_proj", "c_attn", "mlp.c_proj"]
    assert cfg["rank_pattern"] == {"c_attn": 4} and cfg["alpha_pattern"] == {"c_attn": 8}
    from safetensors.torch import load_file

    t = load_file(tmp_path / "g" / "adapter_model.safetensors")
    a = t["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = t["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    q, v = g.blocks[0].attn.q_proj, g.blocks[0].attn.v_proj
    assert torch.equal(a, torch.cat([q.lora_A.weight, v.lora_A.weight]))
    assert b.shape == (96, 4) and torch.equal(b[:32, :2], q.lora_B.weight)
    assert torch.equal(b[64:, 2:], v.lora_B.weight) and not b[32:64].any()
    assert not b[:32, 2:].any() and not b[64:, :2].any()
    back = read_adapter(tmp_path / "g", g.config, "x")
    assert sorted(back) == ["blocks.0.attn.o_proj", "blocks.0.attn.q_proj",
                            "blocks.0.attn.v_proj", "blocks.0.mlp.down_proj",
                            "blocks.1.attn.o_proj", "blocks.1.attn.q_proj",
                            "blocks.1.attn.v_proj", "blocks.1.mlp.down_proj"]  # fmt: skip
    a_q, b_q, scale = back["blocks.0.attn.q_proj"]
    assert scale == 2.0 and torch.allclose(b_q @ a_q, q.lora_B.weight @ q.lora_A.weight)
    # both directions of the name map agree
    for cfg_ in (g.config, llama_like().config, alibi_like().config):
        names_ = module_names(cfg_)
        assert {o for members in grouped(names_).values() for o, _ in members} == set(names_)


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="head is tied to the token embedding"):
        apply_lora(llama_like(), ["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="'qkv' is not one of"):
        apply_lora(llama_like(), "q_proj,qkv")
    with pytest.raises(ValueError, match="gate_proj: no such layer"):
        apply_lora(gpt2_like(), ["gate_proj"])
    assert "blocks.0.mlp.up_proj" in apply_lora(gpt2_like(), ["mlp"])  # a group takes what exists
    model = llama_like()
    apply_lora(model, ["q_proj"])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, ["q_proj"])
    save_adapter(tmp_path, model, base_digest="abc", base_path="ckpt")
    with pytest.raises(ValueError, match="layout is 'gpt2'"):
        merge_adapter(gpt2_like(), tmp_path, base_digest="abc")


class Int8Linear(nn.Module):
    """A stand-in quantized Linear: int8 weight + per-row scale buffers, no `.weight` float."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ (self.qweight.float() * self.scale).T


def test_lora_on_a_quantized_base_calls_its_forward() -> None:
    model = llama_like()
    for block in model.blocks:
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(block.attn, n, Int8Linear(getattr(block.attn, n)))
    quantized = copy.deepcopy(model)
    apply_lora(model, "attn", r=4, alpha=8)
    layer = model.blocks[0].attn.q_proj
    assert isinstance(layer, Int8Linear) and type(layer).__name__ == "LoRAInt8Linear"
    assert {"qweight", "scale", "lora_A.weight", "lora_B.weight"} <= set(layer.state_dict())
    x = ids(model)
    with torch.no_grad():
        assert torch.equal(model(x), quantized(x))
    model.train()
    model(x).logsumexp(-1).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, _ in model.named_parameters() if "lora_" in n}
    with pytest.raises(ValueError, match="cannot merge LoRA into Int8Linear"):
        merge_lora(model)
    trainable, total = trainable_params(model)
    # r (in + out) per layer and projection; k and v have 32 outputs (GQA)
    assert trainable == 2 * 4 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert total == trainable + sum(p.numel() for p in quantized.parameters())


def _hf_roundtrip(hf: nn.Module, dir: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    hf.save_pretrained(dir)
    return AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("make", [llama_like, gpt2_like])
def test_peft_loads_our_adapter_with_the_same_logits(make, tmp_path: Path) -> None:
    from peft import PeftModel

    from llmctl.model.hf import to_hf_gpt2, to_hf_llama

    base = make(tie_embeddings=False)
    model = copy.deepcopy(base)
    targets = ["all", "lm_head"]
    apply_lora(model, targets, r=4, alpha=8, rslora=make is gpt2_like)
    randomize_b(model)
    save_adapter(tmp_path / "adapter", model, base_digest="abc", base_path="ckpt")
    export = to_hf_llama if make is llama_like else to_hf_gpt2
    hf = _hf_roundtrip(export(base), tmp_path / "hf")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = ids(base)
    with torch.no_grad():
        ours, theirs = model(x), peft_model(x).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, base(x), atol=1e-3)


def test_training_changes_only_adapter_tensors_and_saves_only_them(tmp_path: Path) -> None:
    import numpy as np
    from safetensors import safe_open

    from llmctl.train.batches import StepBatches
    from llmctl.train.loop import Writer, train
    from llmctl.train.objectives import NextToken
    from llmctl.train.settings import TrainSettings
    from llmctl.train.state import TENSORS, latest

    model = llama_like()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, "attn,mlp", r=4, alpha=8, dropout=0.1)
    init = {n: m.lora_A.weight.clone() for n, m in lora_layers(model).items()}

    def source(i: int) -> np.ndarray:
        return np.random.default_rng(i).integers(0, V, (2, 17))

    cfg = TrainSettings(steps=3, batch_size=2, seq_len=16, warmup=0, device="cpu", lr=1e-2,
                        weight_decay=0.1, save_every=0, log_every=1)  # fmt: skip
    train(model, StepBatches(source), NextToken(), cfg, Writer(tmp_path, {"base": "x"}))
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # the base, weight decay or not, is untouched
    for n in names:
        m = lora_layers(model)[n]
        assert m.lora_B.weight.abs().sum() > 0 and not torch.equal(m.lora_A.weight, init[n])
    with safe_open(latest(tmp_path / "_state") / TENSORS, "pt") as f:
        saved = {k.split("/", 1)[1] for k in f.keys() if k.startswith("model/")}  # noqa: SIM118
    assert saved == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}


def test_load_adapter_gives_live_layers_equal_to_the_merge(tmp_path: Path) -> None:
    from llmctl.model.adapter import load_adapter

    for make in (llama_like, gpt2_like):
        base = make()
        model = copy.deepcopy(base)
        apply_lora(model, ["q_proj", "v_proj", "up_proj"], r=4, alpha=8, rslora=True)
        randomize_b(model)
        save_adapter(tmp_path / make.__name__, model, base_digest="abc", base_path="c")
        live, merged = copy.deepcopy(base), copy.deepcopy(base)
        load_adapter(live, tmp_path / make.__name__, base_digest="abc")
        merge_adapter(merged, tmp_path / make.__name__, base_digest="abc")
        x = ids(base)
        with torch.no_grad():
            assert torch.allclose(live(x), model(x), atol=1e-5, rtol=0)
            assert torch.allclose(merged(x), model(x), atol=1e-5, rtol=0)


def test_a_checkpoint_saved_with_lora_layers_loads_back(tmp_path: Path) -> None:
    from llmctl.model.io import load_model, save_checkpoint

    model = llama_like()
    apply_lora(model, ["q_proj", "down_proj"], r=2, alpha=4, dropout=0.1, rslora=True)
    randomize_b(model)
    save_checkpoint(tmp_path, model)
    block = json.loads((tmp_path / "config.json").read_text())["lora"]
    assert block == {"r": 2, "alpha": 4.0, "rslora": True, "dropout": 0.1,
                     "modules": list(lora_layers(model))}  # fmt: skip
    back = load_model(tmp_path)
    assert list(lora_layers(back)) == list(lora_layers(model))
    x = ids(model)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
