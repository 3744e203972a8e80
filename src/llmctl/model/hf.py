"""Copy a GPT into the equivalent transformers model (GPT-2 or Llama layout).

Used by the fidelity tests and benchmarks, and as the basis of an export. transformers is
optional at runtime, so it is imported inside the functions.

Example:
    >>> hf = to_hf_gpt2(GPT(preset("gpt2-124m")))
    >>> hf(input_ids).logits  # equals our logits
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from llmctl.model.gpt import GPT, GPTConfig

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, LlamaForCausalLM


def _needs(cfg: GPTConfig, layout: str) -> dict[str, object]:
    if layout == "gpt2":
        return dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, causal=True,
                    n_kv_head=cfg.n_head)  # fmt: skip
    return dict(pos="rope", norm="rmsnorm", mlp="swiglu", causal=True)


def _mismatch(cfg: GPTConfig, layout: str) -> list[str]:
    needs = _needs(cfg, layout)
    return [f"{k}={getattr(cfg, k)!r}" for k, v in needs.items() if getattr(cfg, k) != v]


def _require(cfg: GPTConfig, layout: str) -> None:
    target = {"gpt2": "GPT-2", "llama": "Llama"}[layout]
    wrong = _mismatch(cfg, layout)
    if wrong:
        wanted = _needs(cfg, layout)
        raise ValueError(f"cannot map to {target}: needs {wanted}, has {', '.join(wrong)}")


def hf_layout(cfg: GPTConfig) -> str | None:
    """`"gpt2"` or `"llama"`: the transformers architecture `cfg` maps onto weight for weight
    (`to_hf_gpt2` / `to_hf_llama`), or None when neither fits. Needs no transformers."""
    return next((lay for lay in ("gpt2", "llama") if not _mismatch(cfg, lay)), None)


def hf_module_names(cfg: GPTConfig) -> dict[str, tuple[str, slice | None]]:
    """Every Linear layer of a GPT with `cfg` -> (the name of the transformers module that
    holds it, and the rows of that module's output that are ours, or None for all of them).
    Only GPT-2's fused `c_attn` ([q; k; v]) holds several of ours. Empty when `hf_layout(cfg)`
    is None. Example: "blocks.0.attn.k_proj" -> ("transformer.h.0.attn.c_attn", slice(64, 128))."""
    layout = hf_layout(cfg)
    out: dict[str, tuple[str, slice | None]] = {}
    if layout is None:
        return out
    d, kv = cfg.d_model, cfg.n_kv_head * cfg.head_dim
    for i in range(cfg.n_layer):
        ours = f"blocks.{i}."
        if layout == "llama":
            p = f"model.layers.{i}."
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[f"{ours}attn.{n}"] = (f"{p}self_attn.{n}", None)
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[f"{ours}mlp.{n}"] = (f"{p}mlp.{n}", None)
        else:
            p = f"transformer.h.{i}."
            rows = {"q_proj": slice(0, d), "k_proj": slice(d, d + kv),
                    "v_proj": slice(d + kv, d + 2 * kv)}  # fmt: skip
            for n, r in rows.items():
                out[f"{ours}attn.{n}"] = (f"{p}attn.c_attn", r)
            out[f"{ours}attn.o_proj"] = (f"{p}attn.c_proj", None)
            out[f"{ours}mlp.up_proj"] = (f"{p}mlp.c_fc", None)
            out[f"{ours}mlp.down_proj"] = (f"{p}mlp.c_proj", None)
    out["lm_head"] = ("lm_head", None)
    return out


def to_hf_gpt2(model: GPT) -> GPT2LMHeadModel:
    """A `transformers.GPT2LMHeadModel` with `model`'s weights (eval mode, same dtype).
    Needs learned positions, layernorm, gelu, biases, causal, and n_kv_head == n_head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    _require(cfg, "gpt2")
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_inner=cfg.d_ff,
            activation_function="gelu_new",
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            layer_norm_epsilon=cfg.norm_eps,
            tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=None,  # our tokenizer's ids are not GPT-2's
            eos_token_id=None,
        )
    )
    # GPT-2 stores linears as Conv1D with weight [in, out]: transpose ours.
    sd = {
        "transformer.wte.weight": model.tok_emb.weight,
        "transformer.wpe.weight": model.pos_emb.weight,
        "transformer.ln_f.weight": model.norm_f.weight,
        "transformer.ln_f.bias": model.norm_f.bias,
        "lm_head.weight": model.lm_head.weight,
    }
    for i, block in enumerate(model.blocks):
        p, a, m = f"transformer.h.{i}.", block.attn, block.mlp
        sd |= {
            p + "ln_1.weight": block.norm1.weight,
            p + "ln_1.bias": block.norm1.bias,
            p + "ln_2.weight": block.norm2.weight,
            p + "ln_2.bias": block.norm2.bias,
            p + "attn.c_attn.weight": torch.cat(
                [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]
            ).T,
            p + "attn.c_attn.bias": torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]),
            p + "attn.c_proj.weight": a.o_proj.weight.T,
            p + "attn.c_proj.bias": a.o_proj.bias,
            p + "mlp.c_fc.weight": m.up_proj.weight.T,
            p + "mlp.c_fc.bias": m.up_proj.bias,
            p + "mlp.c_proj.weight": m.down_proj.weight.T,
            p + "mlp.c_proj.bias": m.down_proj.bias,
        }
    return _load(hf, sd, model)


def to_hf_llama(model: GPT) -> LlamaForCausalLM:
    """A `transformers.LlamaForCausalLM` with `model`'s weights (eval mode, same dtype).
    Needs rope, rmsnorm, swiglu and causal; GQA and tying carry over as they are."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.config
    _require(cfg, "llama")
    hf = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.d_ff,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            num_key_value_heads=cfg.n_kv_head,
            head_dim=cfg.head_dim,
            max_position_embeddings=cfg.max_seq_len,
            rms_norm_eps=cfg.norm_eps,
            rope_theta=cfg.rope_theta,
            attention_bias=cfg.bias,
            mlp_bias=cfg.bias,
            attention_dropout=cfg.dropout,
            tie_word_embeddings=cfg.tie_embeddings,
        )
    )
    # Our names were chosen to match Llama's inside each block; only the prefixes differ.
    rename = {
        "tok_emb.": "model.embed_tokens.",
        "norm_f.": "model.norm.",
        "lm_head.": "lm_head.",
    }
    sd = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("blocks."):
            _, i, rest = name.split(".", 2)
            rest = rest.replace("attn.", "self_attn.", 1)
            rest = rest.replace("norm1.", "input_layernorm.").replace(
                "norm2.", "post_attention_layernorm."
            )
            sd[f"model.layers.{i}.{rest}"] = tensor
        else:
            prefix = next(p for p in rename if name.startswith(p))
            sd[rename[prefix] + name.removeprefix(prefix)] = tensor
    return _load(hf, sd, model)


def _load(hf: torch.nn.Module, sd: dict[str, torch.Tensor], model: GPT) -> torch.nn.Module:
    weight = model.tok_emb.weight
    hf.to(device=weight.device, dtype=weight.dtype)
    # strict: a name we forgot to map must fail here, not give silently random weights
    hf.load_state_dict({k: v.detach().contiguous() for k, v in sd.items()}, strict=True)
    return hf.eval()
