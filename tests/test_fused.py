"""Fused projections (model/gpt.py `Fused`): one matmul for q/k/v and gate/up on CUDA, packed
buffers for decoding; parameters, checkpoints and CPU numerics unchanged."""

import pytest
import torch

from llmctl.model.gpt import GPT, Fused, fused_linear, preset


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", mlp="swiglu", bias=True))


def test_fused_linear_equals_the_separate_projections() -> None:
    attn = _model().blocks[0].attn
    x = torch.randn(2, 5, attn.q_proj.in_features)
    linears = (attn.q_proj, attn.k_proj, attn.v_proj)
    want = torch.cat([m(x) for m in linears], -1)
    torch.testing.assert_close(fused_linear(x, linears), want, rtol=1e-6, atol=1e-6)
    # gradients reach each weight and bias as the separate layers would give them
    fused_linear(x, linears).square().sum().backward()
    got = [m.weight.grad.clone() for m in linears] + [m.bias.grad.clone() for m in linears]
    for m in linears:
        m.weight.grad = m.bias.grad = None
    torch.cat([m(x) for m in linears], -1).square().sum().backward()
    again = [m.weight.grad for m in linears] + [m.bias.grad for m in linears]
    for a, b in zip(got, again, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_pack_makes_the_parameters_views_of_one_buffer() -> None:
    model = _model()
    mlp = model.blocks[1].mlp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mlp.fused.pack((mlp.gate_proj, mlp.up_proj))
    assert mlp.gate_proj.weight.data_ptr() == mlp.fused.weight.data_ptr()
    assert mlp.fused.weight.shape == (2 * mlp.up_proj.out_features, mlp.up_proj.in_features)
    # names, shapes and values of the checkpoint are as before; the buffer is not saved
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    # an in-place update of a parameter (an optimizer step) is what the buffer reads
    with torch.no_grad():
        mlp.up_proj.weight.add_(1.0)
    x = torch.randn(3, mlp.up_proj.in_features)
    torch.testing.assert_close(
        torch.nn.functional.linear(x, mlp.fused.weight)[:, mlp.gate_proj.out_features :],
        mlp.up_proj(x),
    )


def test_moving_the_model_forgets_the_packing() -> None:
    model = _model()
    attn = model.blocks[0].attn
    attn.fused.pack((attn.q_proj, attn.k_proj, attn.v_proj))
    model.to(torch.float64)
    assert attn.fused.weight is None and attn.q_proj.weight.dtype == torch.float64


def test_cpu_keeps_separate_layers_and_swapped_layers_run_their_own() -> None:
    fused = Fused()
    a, b = torch.nn.Linear(4, 3), torch.nn.Identity()
    x = torch.randn(2, 4)
    out = fused(x, (a, b))
    assert torch.equal(out[0], a(x)) and torch.equal(out[1], x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fused_and_packed_logits_equal_separate() -> None:
    model = _model().cuda().eval()
    x = torch.randint(0, model.config.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        fused = model(x)
        model.use_decode_layout(1)
        packed = model(x)
        model.to("cpu")
        plain = model(x.cpu())
    torch.testing.assert_close(fused.cpu(), plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed, fused, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_attention_backends_agree() -> None:
    """The first-choice kernel (cuDNN) and FlashAttention-2 give the same outputs and grads."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from llmctl.model import gpt

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 12, 1024, 64, device="cuda", dtype=torch.bfloat16, generator=g)
               .requires_grad_() for _ in range(3))  # fmt: skip
    outs = []
    for order in (gpt.ATTENTION_ORDER, [SDPBackend.FLASH_ATTENTION]):
        with sdpa_kernel(order, set_priority=True):
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            grads = torch.autograd.grad(y.float().square().sum(), (q, k, v))
        outs.append((y, *grads))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
