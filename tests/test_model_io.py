"""Checkpoints: safetensors + config.json round trip, and refusal of damaged files."""

from __future__ import annotations

import functools
import json
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from llmctl.model.gpt import GPT, GPTConfig, preset
from llmctl.model.io import load_config, load_model, save_checkpoint


def make_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", vocab_size=40, **overrides))


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_bitwise(tmp_path: Path, tie: bool) -> None:
    model = make_model(tie_embeddings=tie, pos="relative", bias=True)
    save_checkpoint(tmp_path, model)
    loaded = load_model(tmp_path)
    assert loaded.config == model.config
    assert not loaded.training
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys()
    for name, tensor in saved.items():
        assert torch.equal(tensor, back[name]), name
    assert all(p.requires_grad for p in loaded.parameters())  # ready to fine-tune
    assert (loaded.lm_head.weight is loaded.tok_emb.weight) == tie
    idx = torch.randint(0, 40, (2, 9))
    assert torch.equal(loaded(idx), model.eval()(idx))


def test_files_written(tmp_path: Path) -> None:
    tok = tmp_path / "src.json"
    tok.write_text('{"tokenizer": 1}')
    out = save_checkpoint(
        tmp_path / "ckpt",
        make_model(),
        {"tokenizer.json": tok, "tokenizer_config.json": b'{"chat_template": ""}'},
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]  # fmt: skip
    assert (out / "tokenizer.json").read_text() == '{"tokenizer": 1}'
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llmctl-gpt"
    assert config["architectures"] == ["LlmctlGPT"]
    assert config["dtype"] == "float32"
    assert load_config(out) == make_model().config
    assert "lm_head.weight" not in load_file(out / "model.safetensors")  # tied: stored once
    with pytest.raises(ValueError, match="bad extra file name"):
        save_checkpoint(tmp_path / "x", make_model(), {"../evil": b""})


def test_dtype_and_device_on_load(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, make_model().to(torch.bfloat16))
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(tmp_path).tok_emb.weight.dtype == torch.bfloat16
    loaded = load_model(tmp_path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


def damage(dir: Path, edit) -> None:
    path = dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("blocks.1.mlp.up_proj.weight"), r"missing tensor\(s\) blocks.1.mlp"),
        (lambda t: t.update(extra=torch.zeros(2)), r"unexpected tensor\(s\) extra"),
        (
            lambda t: t.update({"norm_f.weight": torch.ones(3)}),
            r"tensor norm_f.weight has shape \(3,\), expected \(64,\)",
        ),
        (
            lambda t: t.update({"norm_f.weight": torch.ones(64, dtype=torch.float16)}),
            "tensor norm_f.weight is float16, config.json says float32",
        ),
        (
            lambda t: t["blocks.0.attn.q_proj.weight"].__setitem__((0, 0), float("nan")),
            "tensor blocks.0.attn.q_proj.weight has NaN or infinite values",
        ),
    ],
)
def test_load_refuses_damaged_weights(tmp_path: Path, edit, message: str) -> None:
    save_checkpoint(tmp_path, make_model())
    damage(tmp_path, edit)
    with pytest.raises(ValueError, match=r"model\.safetensors: " + message):
        load_model(tmp_path)


def test_load_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"config\.json: not found"):
        load_model(tmp_path)
    save_checkpoint(tmp_path, make_model())
    config_path = tmp_path / "config.json"
    config = json.loads(config_path.read_text())

    config_path.write_text(json.dumps(config | {"n_heads": 4}))
    with pytest.raises(ValueError, match=r"config\.json: GPTConfig: unknown key\(s\) n_heads"):
        load_config(tmp_path)
    config_path.write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not one of llmctl-gpt"):
        load_model(tmp_path)
    config_path.write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_model(tmp_path)

    config_path.write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"model\.safetensors: not found"):
        load_model(tmp_path)


def test_config_from_checkpoint_matches_dataclass(tmp_path: Path) -> None:
    cfg = GPTConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16, pos="alibi", causal=False)
    save_checkpoint(tmp_path, GPT(cfg))
    assert load_config(tmp_path) == cfg


def test_save_refuses_non_finite_weights(tmp_path: Path) -> None:
    model = make_model()
    with torch.no_grad():
        model.blocks[1].mlp.up_proj.weight[0, 0] = float("inf")
    message = r"tensor\(s\) blocks.1.mlp.up_proj.weight have NaN or infinite values"
    with pytest.raises(ValueError, match=message):
        save_checkpoint(tmp_path / "ckpt", model)
    assert not (tmp_path / "ckpt").exists()  # refused before anything was written


@functools.cache
def _valid_files() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(d, make_model(n_layer=1))
        return {p.name: p.read_bytes() for p in Path(d).iterdir()}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_load_of_a_mutated_file_loads_or_raises_value_error(data: st.DataObject) -> None:
    """A short fuzz run (reliability.md C3): byte edits, mostly in the header, and cuts."""
    files = _valid_files()
    raw = bytearray(files["model.safetensors"])
    parsed = 8 + struct.unpack("<Q", raw[:8])[0] + 64  # the header and the first tensor bytes
    edits = st.tuples(st.integers(0, parsed - 1), st.integers(0, 255))
    for pos, byte in data.draw(st.lists(edits, max_size=4)):
        raw[pos] = byte
    cut = data.draw(st.none() | st.integers(0, len(raw)))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "config.json").write_bytes(files["config.json"])
        (Path(d) / "model.safetensors").write_bytes(bytes(raw[:cut]))
        try:
            load_model(d)
        except ValueError as e:
            assert "model.safetensors: " in str(e)
