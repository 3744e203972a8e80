"""model/rwkv.py at its edges: the FLOPs per token MFU is computed from, the hidden states
asked for by layer (0 = the embeddings, n_layer = the last block's output), a roll-back into
a padded call, the settings it refuses."""

from __future__ import annotations

import pytest
import torch

from llmctl.model.rwkv import RWKV, RWKVConfig, preset

pytestmark = pytest.mark.usefixtures("one_thread")


def rwkv(**kw) -> RWKV:
    torch.manual_seed(0)
    return RWKV(preset("rwkv-tiny", vocab_size=40, **kw)).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_flops_per_token_is_6n_plus_the_chunked_wkv(tie: bool) -> None:
    m = rwkv(tie_embeddings=tie)
    n = sum(p.numel() for p in m.parameters())
    if not tie:
        n -= m.tok_emb.weight.numel()
    assert m.num_params() == n
    assert m.num_params(non_embedding=False) == sum(p.numel() for p in m.parameters())
    assert m.flops_per_token(64) == 6 * n + 18 * 2 * 64 * 32  # chunk 32 < 64
    assert m.flops_per_token(16) == 6 * n + 18 * 2 * 64 * 16  # a sequence shorter than a chunk


def test_hidden_layers_are_the_embeddings_and_each_blocks_output() -> None:
    m = rwkv()
    with torch.no_grad():  # the init zeroes the output projections: blocks start as identity
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    idx = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(1))
    logits, hs = m(idx, hidden_layers=[2, 0, 1])
    assert len(hs) == 3 and all(h.shape == (2, 7, 64) for h in hs)
    assert torch.equal(hs[1], m.tok_emb(idx))
    assert torch.equal(m(idx, hidden_layers=[0])[1][0], hs[1])  # the embeddings alone
    _, final = m(idx, return_hidden=True)
    torch.testing.assert_close(m.norm_f(hs[0]), final)
    assert not torch.equal(hs[2], hs[0]) and not torch.equal(hs[2], hs[1])
    torch.testing.assert_close(logits, m(idx))
    for bad in (-1, 3):
        with pytest.raises(ValueError, match=rf"hidden_layers: {bad} is not in 0\.\.2"):
            m(idx, hidden_layers=[bad])
    with pytest.raises(ValueError, match="not both"):
        m(idx, hidden_layers=[1], return_hidden=True)


@pytest.mark.parametrize("key", ["norm_eps", "vocab_size", "chunk_size"])
def test_non_positive_settings_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match=rf"RWKVConfig\.{key} must be"):
        RWKVConfig(**{**preset("rwkv-tiny").__dict__, key: 0})


def test_crop_inside_a_padded_call_keeps_the_padding_masked() -> None:
    """Left-padded rows: rolling back into the first call feeds its first tokens again with
    their mask, so the state equals one built up to that length directly."""
    m = rwkv()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :2] = False  # row 1 starts with two pads
    nxt = torch.tensor([[5], [7]])
    state = m.make_cache(2, 16)
    m(ids, attention_mask=mask, cache=state)
    m(nxt, attention_mask=torch.ones(2, 7, dtype=torch.bool), cache=state)
    state.crop(4)
    direct = m.make_cache(2, 16)
    m(ids[:, :4], attention_mask=mask[:, :4], cache=direct)
    step = torch.cat([mask[:, :4], torch.ones(2, 1, dtype=torch.bool)], 1)
    got = m(nxt, attention_mask=step, cache=state)
    assert torch.equal(got, m(nxt, attention_mask=step, cache=direct))


def _noisy(m: RWKV) -> RWKV:
    with torch.no_grad():  # the init zeroes the output projections: blocks start as identity
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_packed_documents_restart_the_state_and_the_token_shift() -> None:
    m = _noisy(rwkv())
    ids = torch.randint(0, 40, (1, 9), generator=torch.Generator().manual_seed(2))
    seg = torch.tensor([[4] * 4 + [7] * 5])
    with torch.no_grad():
        packed = m(ids, segment_ids=seg)
        first, second = m(ids[:, :4]), m(ids[:, 4:])
    torch.testing.assert_close(packed[:, :4], first, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed[:, 4:], second, rtol=0, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(3))
    seg = torch.tensor([[1] * 4 + [2] * 5, [1] * 9])
    grads = []
    for ckpt in (False, True):
        m = _noisy(rwkv()).train()
        m.gradient_checkpointing = ckpt
        loss = m(ids, segment_ids=seg).float().square().mean()
        loss.backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
