"""The transformer: shapes, causality, KV-cache decoding, padding, GQA, init, HF fidelity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from llmctl.model.gpt import GPT, PRESETS, GPTConfig, KVCache, preset

POSITIONS = ["learned", "sinusoidal", "rope", "alibi", "relative"]
VOCAB = 50


def small_config(pos: str = "rope", **overrides) -> GPTConfig:
    # rel_max_distance small enough that test sequences reach the logarithmic buckets
    kwargs = dict(
        vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=64,
        max_seq_len=64, pos=pos, rel_buckets=8, rel_max_distance=16,
    )  # fmt: skip
    return GPTConfig(**(kwargs | overrides))


def build(pos: str = "rope", seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(small_config(pos, **overrides)).eval()


def tokens(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("pos", "causal", "norm_mlp"),
    list(
        itertools.product(POSITIONS, [True, False], [("layernorm", "gelu"), ("rmsnorm", "swiglu")])
    ),
)
def test_shapes(pos: str, causal: bool, norm_mlp: tuple[str, str]) -> None:
    norm, mlp = norm_mlp
    model = build(pos, causal=causal, norm=norm, mlp=mlp, bias=norm == "layernorm")
    idx = tokens(3, 11)
    logits, hidden = model(idx, return_hidden=True)
    assert logits.shape == (3, 11, VOCAB)
    assert hidden.shape == (3, 11, 32)
    assert torch.isfinite(logits).all()
    assert torch.equal(model(idx), logits)


@pytest.mark.parametrize("pos", POSITIONS)
def test_causal_model_ignores_the_future(pos: str) -> None:
    model = build(pos)
    idx = tokens(2, 20)
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=0)
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("pos", POSITIONS)
def test_bidirectional_model_sees_the_future(pos: str) -> None:
    model = build(pos, causal=False)
    idx = tokens(2, 20)
    changed = idx.clone()
    changed[:, 15] = (changed[:, 15] + 1) % VOCAB
    assert not torch.allclose(model(idx)[:, :15], model(changed)[:, :15])


def decode(model: GPT, idx: torch.Tensor, cache: KVCache, chunks: list[int]) -> torch.Tensor:
    """Feed idx through the cache in chunks of the given sizes; concatenated logits."""
    out, start = [], 0
    for n in chunks:
        out.append(model(idx[:, start : start + n], cache=cache))
        start += n
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("pos", POSITIONS)
def test_cached_decoding_equals_full_forward(pos: str) -> None:
    model = build(pos)
    idx = tokens(2, 24)
    full = model(idx)
    cache = model.make_cache(2, 32)
    # a prefill, single tokens, then a multi-token chunk on a non-empty cache
    stepped = decode(model, idx, cache, [7] + [1] * 12 + [5])
    assert cache.length == 24
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos", POSITIONS)
def test_crop_then_redecode(pos: str) -> None:
    model = build(pos)
    idx = tokens(2, 16)
    cache = model.make_cache(2, 20)
    decode(model, idx, cache, [10, 1, 1, 1])
    cache.crop(9)
    other = torch.cat([idx[:, :9], tokens(2, 7, seed=5)], dim=1)
    redone = decode(model, other[:, 9:], cache, [3, 1, 1, 1, 1])
    torch.testing.assert_close(redone, model(other)[:, 9:], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="crop"):
        cache.crop(17)


@pytest.mark.parametrize("pos", ["rope", "relative"])
def test_reorder_selects_and_expands_rows(pos: str) -> None:
    model = build(pos)
    prompt = tokens(2, 6)
    cache = model.make_cache(2, 16)
    model(prompt, cache=cache)
    index = torch.tensor([1, 0, 1])  # beam search may also grow the batch
    cache.reorder(index)
    assert cache.batch_size == 3
    nxt = tokens(3, 4, seed=7)
    stepped = decode(model, nxt, cache, [1, 1, 2])
    full = model(torch.cat([prompt[index], nxt], dim=1))[:, 6:]
    torch.testing.assert_close(stepped, full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("explicit_positions", [True, False])
def test_left_padded_batch_equals_each_row_alone(pos: str, explicit_positions: bool) -> None:
    model = build(pos)
    lengths = [7, 4, 1]
    rows = [tokens(1, n, seed=10 + n)[0] for n in lengths]
    width = max(lengths)
    idx = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        idx[b, width - len(row) :] = row
        mask[b, width - len(row) :] = True
    new = tokens(3, 3, seed=3)

    def position_ids(mask: torch.Tensor, t: int) -> torch.Tensor | None:
        return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -t:] if explicit_positions else None

    # without a cache (training with padding, or scoring)
    batched = model(idx, attention_mask=mask, position_ids=position_ids(mask, width))
    # with a cache: prefill, then one token at a time, the mask growing by one column each time
    cache = model.make_cache(3, width + 3)
    prefill = model(idx, attention_mask=mask, position_ids=position_ids(mask, width), cache=cache)
    steps = []
    for t in range(3):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.bool)], dim=1)
        steps.append(
            model(new[:, t : t + 1], attention_mask=mask, position_ids=position_ids(mask, 1),
                  cache=cache)
        )  # fmt: skip
    steps = torch.cat(steps, dim=1)
    for b, row in enumerate(rows):
        alone = model(torch.cat([row, new[b]])[None])[0]
        n = len(row)
        torch.testing.assert_close(batched[b, width - n :], alone[:n], rtol=0, atol=1e-5)
        torch.testing.assert_close(prefill[b, width - n :], alone[:n], rtol=0, atol=1e-5)
        torch.testing.assert_close(steps[b], alone[n:], rtol=0, atol=1e-5)
    assert torch.isfinite(batched).all()  # padding queries must not produce NaN


@pytest.mark.parametrize("pos", POSITIONS)
def test_padded_bidirectional_equals_unpadded(pos: str) -> None:
    model = build(pos, causal=False)
    row = tokens(1, 6)
    idx = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 6])
    out = model(idx, attention_mask=mask)
    torch.testing.assert_close(out[:, 3:], model(row), rtol=0, atol=1e-5)


def test_cache_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="causal=False"):
        build(causal=False).make_cache(1, 8)
    model = build()
    cache = model.make_cache(1, 8)
    with pytest.raises(ValueError, match="cache is full"):
        model(tokens(1, 9), cache=cache)
    with pytest.raises(ValueError, match="rows"):
        model(tokens(2, 3), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.make_cache(1, 65)
    with pytest.raises(ValueError, match="attention_mask"):
        model(tokens(1, 4), attention_mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 65))


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_gqa_and_mqa(n_kv_head: int) -> None:
    model = build(n_kv_head=n_kv_head)
    attn = model.blocks[0].attn
    assert attn.q_proj.weight.shape == (32, 32)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (n_kv_head * 8, 32)
    cache = model.make_cache(2, 10)
    assert cache.k[0].shape == (2, n_kv_head, 10, 8)
    idx = tokens(2, 10)
    torch.testing.assert_close(decode(model, idx, cache, [4] + [1] * 6), model(idx), atol=1e-5,
                               rtol=0)  # fmt: skip


def test_projections_are_plain_linears() -> None:
    names = {n for n, m in build().named_modules() if isinstance(m, torch.nn.Linear)}
    for proj in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):  # fmt: skip
        assert f"blocks.1.{proj}" in names
    assert "lm_head" in names


def test_tied_embeddings_share_storage() -> None:
    tied, untied = build(), build(tie_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()
    assert untied.num_params(non_embedding=False) - tied.num_params(non_embedding=False) == (
        VOCAB * 32
    )


def test_logits_to_keep_is_the_tail_of_the_full_logits() -> None:
    model = build()
    idx = tokens(2, 9)
    full = model(idx)
    torch.testing.assert_close(model(idx, logits_to_keep=1), full[:, -1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(idx, logits_to_keep=3), full[:, -3:], rtol=0, atol=1e-6)


def test_decode_layout_changes_memory_order_only() -> None:
    model = build(bias=True, norm="layernorm", mlp="gelu")
    idx = tokens(2, 9)
    before, state = model(idx), {k: v.clone() for k, v in model.state_dict().items()}
    model.use_decode_layout(1)
    w = model.blocks[0].attn.q_proj.weight
    assert w.shape == (32, 32) and w.t().is_contiguous()  # float32 CPU: [in, out] in memory
    assert model.lm_head.weight is model.tok_emb.weight  # still tied
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(model(idx), before, rtol=0, atol=1e-5)
    model.train()(idx).sum().backward()  # still an ordinary, trainable model
    assert w.grad is not None and w.grad.shape == w.shape
    model.use_decode_layout(8)  # batched: GEMMs, row-major again
    assert w.is_contiguous()
    model.use_decode_layout(1)
    model.to(torch.bfloat16).use_decode_layout(1)  # oneDNN prefers row-major bfloat16
    assert model.blocks[0].attn.q_proj.weight.is_contiguous()


def test_init_std() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1000, n_layer=8, n_head=4, d_model=256, bias=True))
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.02)
    assert model.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.02)
    scaled = 0.02 / math.sqrt(16)
    assert model.blocks[3].attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.02)
    assert model.blocks[3].mlp.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.02)
    assert torch.all(model.blocks[0].attn.q_proj.bias == 0)
    assert torch.all(model.norm_f.weight == 1)


def test_param_count_and_flops_of_gpt2_124m() -> None:
    with torch.device("meta"):
        model = GPT(preset("gpt2-124m"))
    assert model.num_params(non_embedding=False) == 124_439_808  # GPT-2 small
    assert model.num_params() == 124_439_808 - 1024 * 768  # minus the position table
    assert model.flops_per_token(1024) == 6 * model.num_params() + 12 * 12 * 768 * 1024


def test_small_preset_size() -> None:
    with torch.device("meta"):
        model = GPT(preset("small"))
    non_embedding = model.num_params() - model.tok_emb.weight.numel()
    assert 9e6 < non_embedding < 12e6


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid(name: str) -> None:
    assert preset(name, vocab_size=123).vocab_size == 123


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    idx = tokens(2, 12)
    grads = []
    for flag in (False, True):
        model = build("relative").train()
        model.gradient_checkpointing = flag
        model(idx).logsumexp(-1).mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_dropout_only_in_training() -> None:
    model = build(dropout=0.5)
    idx = tokens(1, 8)
    assert torch.equal(model(idx), model(idx))
    model.train()
    assert not torch.equal(model(idx), model(idx))


def test_config_round_trip_and_validation() -> None:
    cfg = small_config("alibi", dropout=0.1)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert GPTConfig(vocab_size=10, n_layer=1, n_head=2, d_model=8).n_kv_head == 2
    assert GPTConfig(vocab_size=10, n_layer=1, n_head=2, d_model=8, rope_theta=500).rope_theta \
        == 500.0  # fmt: skip
    bad = [
        (dict(d_model=30), "n_head=4 must divide d_model=30"),
        (dict(n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
        (dict(d_model=24, n_head=8, n_kv_head=8), "rope needs an even head dim"),
        (dict(pos="nope"), "GPTConfig.pos must be one of"),
        (dict(norm="batchnorm"), "GPTConfig.norm must be one of"),
        (dict(dropout=1.0), "dropout"),
        (dict(n_layer=0), "n_layer must be >= 1"),
        (dict(n_layer=2.0), "n_layer must be int"),
        (dict(causal=1), "causal must be bool"),
        (dict(rel_max_distance=4), "rel_max_distance"),
    ]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            small_config(**overrides)
    with pytest.raises(ValueError, match=r"unknown key.*bogus, extra"):
        GPTConfig.from_dict(cfg.to_dict() | {"extra": 1, "bogus": 2})
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")


def test_gpt2_fidelity_with_transformers() -> None:
    pytest.importorskip("transformers")
    from llmctl.model.hf import to_hf_gpt2

    torch.manual_seed(0)
    cfg = preset("gpt2-124m", vocab_size=VOCAB, n_layer=2, n_head=4, d_model=32, d_ff=128,
                 max_seq_len=64)  # fmt: skip
    model = GPT(cfg).eval()
    idx = tokens(2, 20)
    with torch.no_grad():
        hf_logits = to_hf_gpt2(model)(idx).logits
    torch.testing.assert_close(model(idx), hf_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_llama_fidelity_with_transformers(tie: bool) -> None:
    pytest.importorskip("transformers")
    from llmctl.model.hf import to_hf_llama

    model = build("rope", tie_embeddings=tie, rope_theta=500.0)
    idx = tokens(2, 20)
    with torch.no_grad():
        hf_logits = to_hf_llama(model)(idx).logits
    torch.testing.assert_close(model(idx), hf_logits, rtol=0, atol=1e-5)


def test_hf_mapping_refuses_other_architectures() -> None:
    pytest.importorskip("transformers")
    from llmctl.model.hf import to_hf_gpt2, to_hf_llama

    with pytest.raises(ValueError, match="cannot map to GPT-2"):
        to_hf_gpt2(build("rope"))
    with pytest.raises(ValueError, match="cannot map to Llama"):
        to_hf_llama(build("alibi"))
