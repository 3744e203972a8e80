"""GGUF export: the `gguf` package's reader reads back every key and every tensor, in each type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmctl.model import llama2c
from llmctl.model.gguf import TYPES, gguf_tensors, read_back, tensor_type, write_gguf
from llmctl.model.gpt import GPT, GPTConfig, preset
from llmctl.tokenizer import save_tokenizer, train_tokenizer

gguf = pytest.importorskip("gguf")
TEXT = ["the quick brown fox jumps over the lazy dog " * 3, "hello world, hello there"] * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(TEXT, vocab_size=300), out, model_max_length=64)
    return out


def model_of(layout: str, vocab: int) -> GPT:
    torch.manual_seed(0)
    if layout == "llama":
        cfg = preset("tiny", vocab_size=vocab, tie_embeddings=False, d_ff=96)
    else:
        cfg = preset("gpt2-124m", vocab_size=vocab, n_layer=2, n_head=4, d_model=64, d_ff=128,
                     max_seq_len=64)  # fmt: skip
    return GPT(cfg).eval()


@pytest.mark.parametrize("layout", ["llama", "gpt2"])
@pytest.mark.parametrize("type", TYPES)
def test_every_key_and_tensor_reads_back(tmp_path: Path, tok_dir: Path, layout: str,
                                         type: str) -> None:  # fmt: skip
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    model = model_of(layout, tok.get_vocab_size() + 4)  # room for unused rows
    path = tmp_path / "m.gguf"
    stats = write_gguf(model, tok_dir, path, type, license="Apache-2.0", sources=["src-a"])
    meta, tensors = read_back(path)
    cfg = model.config
    a = layout
    want = {
        "general.architecture": a, "general.license": "Apache-2.0", "general.sources": ["src-a"],
        f"{a}.context_length": 64, f"{a}.embedding_length": 64, f"{a}.block_count": 2,
        f"{a}.feed_forward_length": cfg.d_ff, f"{a}.attention.head_count": 4,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": True,  # llmctl prompts start with <|eos|>
    }  # fmt: skip
    if layout == "llama":
        want |= {"llama.attention.head_count_kv": 2, "llama.rope.freq_base": 10000.0,
                 "llama.rope.dimension_count": 16}  # fmt: skip
    for k, v in want.items():
        assert meta[k] == v, k
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == cfg.vocab_size and tokens[:2] == ["<|bos|>", "<|eos|>"]
    assert tokens[-1] == f"[PAD{cfg.vocab_size - 1}]"
    assert len(meta["tokenizer.ggml.merges"]) == len(json.loads(tok.to_str())["model"]["merges"])
    assert "<|assistant|>" in meta["tokenizer.chat_template"]
    ours = gguf_tensors(model)
    assert tensors.keys() == ours.keys()
    for name, arr in ours.items():
        kind, got = tensors[name]
        assert kind == tensor_type(name, arr.shape, type), name
        assert got.shape == arr.shape, name
        qt = getattr(gguf.GGMLQuantizationType, kind.upper())
        ref = gguf.quants.dequantize(gguf.quants.quantize(arr, qt), qt).reshape(arr.shape)
        np.testing.assert_array_equal(got, ref, err_msg=name)
    assert sum(stats["tensor_types"].values()) == len(ours)


def test_llama_q_k_rows_are_in_llama_cpp_order() -> None:
    model = model_of("llama", 300)
    t = gguf_tensors(model)
    q = model.blocks[0].attn.q_proj.weight.detach().numpy()
    back = llama2c._interleaved_to_halves(t["blk.0.attn_q.weight"], model.config.n_head)
    np.testing.assert_array_equal(back, q)
    assert not np.array_equal(t["blk.0.attn_q.weight"], q)


def test_unaligned_matrices_fall_back_to_f16() -> None:
    assert tensor_type("blk.0.ffn_down.weight", (64, 172), "q4_0") == "f16"
    assert tensor_type("blk.0.ffn_up.weight", (172, 64), "q4_0") == "q4_0"
    assert tensor_type("output_norm.weight", (64,), "q8_0") == "f32"


@pytest.mark.parametrize("layout", ["llama", "gpt2"])
def test_transformers_gguf_loader_computes_our_logits(tmp_path: Path, tok_dir: Path,
                                                      layout: str) -> None:  # fmt: skip
    """transformers' own GGUF reader (llama.cpp's conventions, q/k order included) rebuilds
    the model from the file: the same logits as ours (F32 exactly, F16 to its rounding)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    model = model_of(layout, tok.get_vocab_size())
    if layout == "gpt2":
        # transformers' GGUF reader ignores gpt2.context_length/feed_forward_length (llama.cpp
        # reads them) and takes GPT-2's defaults, so the model here has those sizes.
        torch.manual_seed(0)
        cfg = dict(model.config.to_dict(), max_seq_len=1024, d_ff=256)
        model = GPT(GPTConfig(**cfg)).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ours = model(ids)
    for type, atol in (("f32", 1e-5), ("f16", 2e-2)):
        write_gguf(model, tok_dir, tmp_path / f"{type}.gguf", type)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file=f"{type}.gguf", dtype=torch.float32
        ).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(ids).logits, ours, rtol=0, atol=atol)
