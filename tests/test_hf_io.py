"""transformers folders in and out: logits equal transformers' to 1e-5 (fp32), round trips give
identical tensors, and every config key is understood, ignored as metadata, or refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmctl.model.gpt import GPT, preset
from llmctl.model.hf import hf_state, read_hf, read_hf_config, save_hf

transformers = pytest.importorskip("transformers")

IDS = torch.tensor([[1, 5, 9, 60, 3, 2, 17, 42, 8, 0, 63, 31]])


def tiny_gpt2(dir: Path, tie: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(dir)
    return model


def tiny_llama(dir: Path, tie: bool = False, shard: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
        rope_theta=500000.0,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(dir, max_shard_size="20KB" if shard else "5GB")
    return model


def assert_same_logits(ours: GPT, theirs: torch.nn.Module) -> None:
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), theirs(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_import_gpt2(tmp_path: Path, tie: bool) -> None:
    hf = tiny_gpt2(tmp_path, tie)
    ours = read_hf(tmp_path)
    assert ours.config.tie_embeddings is tie and ours.config.pos == "learned"
    assert_same_logits(ours, hf)


@pytest.mark.parametrize(("tie", "shard"), [(False, False), (True, True)])
def test_import_llama_gqa(tmp_path: Path, tie: bool, shard: bool) -> None:
    hf = tiny_llama(tmp_path, tie, shard)
    assert (tmp_path / "model.safetensors.index.json").exists() is shard
    ours = read_hf(tmp_path)
    assert (ours.config.n_kv_head, ours.config.rope_theta) == (2, 500000.0)
    assert_same_logits(ours, hf)


def test_rope_v4_and_v5_spellings_agree(tmp_path: Path) -> None:
    hf = tiny_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg |= {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "default"}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_same_logits(read_hf(tmp_path), hf)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    cfg.pop("rope_theta")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_same_logits(read_hf(tmp_path), hf)


@pytest.mark.parametrize("layout", ["tiny", "gpt2"])
def test_export_then_transformers_and_back(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(1)
    if layout == "tiny":
        cfg = preset("tiny", vocab_size=64, tie_embeddings=False)
    else:
        cfg = preset("gpt2-124m", vocab_size=64, n_layer=2, n_head=4, d_model=32, d_ff=64,
                     max_seq_len=32)  # fmt: skip
    model = GPT(cfg).eval()
    save_hf(model, tmp_path, {"bos_token_id": 1, "eos_token_id": 2})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_logits(model, theirs)
    back = read_hf(tmp_path)
    assert back.config == cfg
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert hf_state(back).keys() == hf_state(model).keys()


def edit_config(dir: Path, **changes: object) -> None:
    cfg = json.loads((dir / "config.json").read_text())
    for k, v in changes.items():
        if v is None and k.startswith("drop_"):
            cfg.pop(k.removeprefix("drop_"), None)
        else:
            cfg[k] = v
    (dir / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"frobnicate": 3}, "unknown key 'frobnicate' for a llama model"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
         "key 'rope_parameters'="),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "key 'rope_scaling'="),
        ({"hidden_act": "gelu"}, "key 'hidden_act'='gelu' is not supported"),
        ({"attention_bias": True}, "key 'attention_bias'=True with 'mlp_bias'=False"),
        ({"model_type": "mistral", "sliding_window": 16}, "key 'sliding_window'=16"),
        ({"model_type": "qwen2"}, "key 'model_type'='qwen2' is not supported"),
        ({"head_dim": 16}, "key 'head_dim'=16 is not supported"),
        ({"quantization_config": {"quant_method": "gptq"}}, "unknown key 'quantization_config'"),
        ({"drop_vocab_size": None}, "key 'vocab_size' is missing"),
    ],
)  # fmt: skip
def test_bad_configs_name_the_key(tmp_path: Path, change: dict, message: str) -> None:
    tiny_llama(tmp_path)
    edit_config(tmp_path, **change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")) as e:
        read_hf(tmp_path)
    assert "config.json" in str(e.value) and "\n" not in str(e.value)


def test_metadata_and_harmless_keys_are_ignored(tmp_path: Path) -> None:
    hf = tiny_llama(tmp_path)
    edit_config(tmp_path, torch_dtype="float32", _name_or_path="x", use_cache=False,
                model_type="mistral", sliding_window=None)  # fmt: skip
    assert_same_logits(read_hf(tmp_path), hf)
    assert read_hf_config(tmp_path)[0] == "llama"


def test_bad_weight_files(tmp_path: Path) -> None:
    tiny_gpt2(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file"):
        read_hf(tmp_path)
    weights.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: a pickle file.*save_pretrained"):
        read_hf(tmp_path)


def test_missing_and_misshapen_tensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tiny_llama(tmp_path)
    path = tmp_path / "model.safetensors"
    state = load_file(path)
    del state["model.norm.weight"]
    save_file(state, path)
    with pytest.raises(ValueError, match=r"missing tensor\(s\) model.norm.weight"):
        read_hf(tmp_path)
    state["model.norm.weight"] = torch.ones(31)
    save_file(state, path)
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(31,\), expected \(32,\)"):
        read_hf(tmp_path)
    state["model.norm.weight"] = torch.full((32,), float("nan"))
    save_file(state, path)
    with pytest.raises(ValueError, match=r"model.norm.weight is not finite"):
        read_hf(tmp_path)
