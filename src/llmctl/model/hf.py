"""Our GPT in transformers' layouts (GPT-2, Llama), both ways, without transformers at run time.

- `hf_config(cfg)` / `hf_state(model)`: the `config.json` and named tensors of the equivalent
  transformers model (GPT-2 when the model has learned positions, LayerNorm, GELU and biases;
  Llama for RoPE, RMSNorm, SwiGLU; anything else is a ValueError saying what is missing).
- `read_hf(dir)`: a local transformers folder (`config.json` + `model.safetensors`, or shards
  with `model.safetensors.index.json`) of a GPT-2, Llama or Mistral model, as our GPT. Every
  config key is either understood, known not to change the computation, or refused by name:
  a model that loads and computes something else is the one outcome that must not happen.
- `to_hf_gpt2` / `to_hf_llama`: the transformers model itself (tests and benchmarks only;
  transformers is imported inside them).
- An RWKV (`RWKVConfig`) has the "rwkv" layout (`RwkvForCausalLM`): every function above
  dispatches to `model/hf_rwkv.py` for it.

Example:
    >>> model = read_hf("path/to/TinyLlama")          # ValueError names a bad key or tensor
    >>> config, tensors = hf_config(model.config), hf_state(model)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open

from llmctl.files import check_regular
from llmctl.model import hf_rwkv
from llmctl.model.gpt import GPT, GPTConfig
from llmctl.model.rwkv import RWKVConfig

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

LAYOUTS = ("gpt2", "llama", "rwkv")  # rwkv: an RWKVConfig, in model/hf_rwkv.py
GGUF_LAYOUTS = ("gpt2", "llama")  # what model/gguf.py writes (llama.cpp has no RWKV-4)
_GPT2 = dict(pos="learned", norm="layernorm", mlp="gelu", bias=True, causal=True)
_LLAMA = dict(pos="rope", norm="rmsnorm", mlp="swiglu", causal=True)

# Keys of every transformers config that say nothing about the computation.
_META = {
    "transformers_version", "architectures", "model_type", "torch_dtype", "dtype", "use_cache",
    "_name_or_path", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
    "problem_type", "tokenizer_class", "task_specific_params", "is_encoder_decoder",
    "chunk_size_feed_forward", "torchscript", "pruned_heads", "tf_legacy_loss", "use_bfloat16",
    "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id", "max_length",
    "min_length", "do_sample", "early_stopping", "num_beams", "temperature", "top_k", "top_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "diversity_penalty", "num_beam_groups",
    "typical_p", "encoder_no_repeat_ngram_size", "is_decoder", "cross_attention_hidden_size",
    "tie_encoder_decoder", "add_cross_attention", "_attn_implementation_autoset",
    "attn_implementation", "_commit_hash",
    # dropout and the GPT-2 double-heads summary only matter when training those heads
    "attn_pdrop", "embd_pdrop", "resid_pdrop", "attention_dropout", "summary_type",
    "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
}  # fmt: skip


# ----------------------------------------------------------------------------- export


def hf_layout(cfg: Any) -> str:
    """The transformers architecture ("gpt2", "llama"; "rwkv" for an RWKV) that computes what
    `cfg` computes."""
    if isinstance(cfg, RWKVConfig):
        hf_rwkv.check(cfg)
        return hf_rwkv.LAYOUT
    if cfg.head != "lm":
        raise ValueError(f"a {cfg.head!r}-head model; the causal LM layouts need head='lm'")
    if all(getattr(cfg, k) == v for k, v in _GPT2.items()) and cfg.n_kv_head == cfg.n_head:
        return "gpt2"
    if all(getattr(cfg, k) == v for k, v in _LLAMA.items()):
        return "llama"
    raise ValueError(
        "no transformers layout computes this model: GPT-2 needs "
        + ", ".join(f"{k}={v!r}" for k, v in _GPT2.items())
        + " and n_kv_head == n_head; Llama needs "
        + ", ".join(f"{k}={v!r}" for k, v in _LLAMA.items())
        + f"; it has pos={cfg.pos!r}, norm={cfg.norm!r}, mlp={cfg.mlp!r}, bias={cfg.bias}, "
        f"causal={cfg.causal}"
    )


def _require(cfg: GPTConfig, target: str, layout: str) -> None:
    try:
        got = hf_layout(cfg)
    except ValueError as e:
        raise ValueError(f"cannot map to {target}: {e}") from None
    if got != layout:
        raise ValueError(f"cannot map to {target}: this model has the {got} layout")


def hf_config(
    cfg: GPTConfig,
    dtype: torch.dtype = torch.float32,
    token_ids: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """The `config.json` of the transformers model equivalent to `cfg` (GPT-2, Llama or RWKV).
    `token_ids` may give bos_token_id / eos_token_id / pad_token_id."""
    if isinstance(cfg, RWKVConfig):
        return hf_rwkv.hf_config(cfg, dtype, token_ids)
    layout = hf_layout(cfg)
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(token_ids or {})}
    if layout == "gpt2":
        body: dict[str, Any] = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_positions": cfg.max_seq_len,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.d_ff,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    else:
        body = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "intermediate_size": cfg.d_ff,
            "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head,
            "head_dim": cfg.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps,
            # both spellings: v4 reads rope_theta/rope_scaling, v5 rope_parameters
            "rope_theta": cfg.rope_theta,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "attention_bias": cfg.bias,
            "mlp_bias": cfg.bias,
            "attention_dropout": cfg.dropout,
            "pretraining_tp": 1,
        }
    return {
        **body,
        **ids,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def hf_state(model: GPT) -> dict[str, torch.Tensor]:
    """`model`'s weights under transformers' names and shapes (contiguous, on the CPU); a tied
    lm head is stored once, as transformers stores it."""
    if isinstance(model.config, RWKVConfig):
        return hf_rwkv.hf_state(model)  # type: ignore[arg-type]
    return {k: v.contiguous().cpu() for k, v in _hf_named(model).items()}


def _hf_named(model: GPT) -> dict[str, torch.Tensor]:
    cfg = model.config
    layout = hf_layout(cfg)
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    if layout == "gpt2":
        out |= {
            "transformer.wte.weight": ours["tok_emb.weight"],
            "transformer.wpe.weight": ours["pos_emb.weight"],
            "transformer.ln_f.weight": ours["norm_f.weight"],
            "transformer.ln_f.bias": ours["norm_f.bias"],
        }
        for i in range(cfg.n_layer):
            b, p = f"blocks.{i}.", f"transformer.h.{i}."
            qkv = ("attn.q_proj", "attn.k_proj", "attn.v_proj")
            # GPT-2 stores linears as Conv1D with weight [in, out]: transpose ours.
            out |= {
                p + "ln_1.weight": ours[b + "norm1.weight"],
                p + "ln_1.bias": ours[b + "norm1.bias"],
                p + "ln_2.weight": ours[b + "norm2.weight"],
                p + "ln_2.bias": ours[b + "norm2.bias"],
                p + "attn.c_attn.weight": torch.cat([ours[b + n + ".weight"] for n in qkv]).T,
                p + "attn.c_attn.bias": torch.cat([ours[b + n + ".bias"] for n in qkv]),
                p + "attn.c_proj.weight": ours[b + "attn.o_proj.weight"].T,
                p + "attn.c_proj.bias": ours[b + "attn.o_proj.bias"],
                p + "mlp.c_fc.weight": ours[b + "mlp.up_proj.weight"].T,
                p + "mlp.c_fc.bias": ours[b + "mlp.up_proj.bias"],
                p + "mlp.c_proj.weight": ours[b + "mlp.down_proj.weight"].T,
                p + "mlp.c_proj.bias": ours[b + "mlp.down_proj.bias"],
            }
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = ours["lm_head.weight"]
    else:
        for name, tensor in ours.items():
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            out[_llama_name(name)] = tensor
    return out


def _llama_name(name: str) -> str:
    # Our names were chosen to match Llama's inside each block; only the prefixes differ.
    if name.startswith("blocks."):
        _, i, rest = name.split(".", 2)
        rest = rest.replace("attn.", "self_attn.", 1)
        rest = rest.replace("norm1.", "input_layernorm.").replace(
            "norm2.", "post_attention_layernorm."
        )
        return f"model.layers.{i}.{rest}"
    for ours, theirs in (("tok_emb.", "model.embed_tokens."), ("norm_f.", "model.norm.")):
        if name.startswith(ours):
            return theirs + name.removeprefix(ours)
    return name  # lm_head.weight


def maybe_hf_layout(cfg: GPTConfig) -> str | None:
    """`hf_layout(cfg)`, or None when no transformers layout fits (adapters then keep our
    module names)."""
    try:
        return hf_layout(cfg)
    except ValueError:
        return None


def hf_module_names(cfg: GPTConfig) -> dict[str, tuple[str, slice | None]]:
    """Every Linear layer of a GPT with `cfg` -> (the name of the transformers module that
    holds it, and the rows of that module's output that are ours, or None for all of them).
    Only GPT-2's fused `c_attn` ([q; k; v]) holds several of ours. Empty when no layout fits.
    Example: "blocks.0.attn.k_proj" -> ("transformer.h.0.attn.c_attn", slice(64, 128))."""
    layout = maybe_hf_layout(cfg)
    out: dict[str, tuple[str, slice | None]] = {}
    if layout is None:
        return out
    if layout == hf_rwkv.LAYOUT:
        return hf_rwkv.module_names(cfg)
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

    _require(model.config, "GPT-2", "gpt2")
    hf = GPT2LMHeadModel(GPT2Config(**_for_transformers(model)))
    return _load(hf, model)


def to_hf_llama(model: GPT) -> LlamaForCausalLM:
    """A `transformers.LlamaForCausalLM` with `model`'s weights (eval mode, same dtype).
    Needs rope, rmsnorm, swiglu and causal; GQA and tying carry over as they are."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _require(model.config, "Llama", "llama")
    hf = LlamaForCausalLM(LlamaConfig(**_for_transformers(model)))
    return _load(hf, model)


def _for_transformers(model: GPT) -> dict[str, Any]:
    cfg = hf_config(model.config)
    for key in ("architectures", "model_type", "dtype", "torch_dtype"):
        del cfg[key]
    return cfg


def _load(hf: torch.nn.Module, model: GPT) -> torch.nn.Module:
    weight = model.tok_emb.weight
    hf.to(device=weight.device, dtype=weight.dtype)
    sd = hf_state(model)
    if model.config.tie_embeddings:
        sd["lm_head.weight"] = sd[
            next(k for k in sd if k.endswith(("wte.weight", "embed_tokens.weight")))
        ]
    # strict: a name we forgot to map must fail here, not give silently random weights
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


# ----------------------------------------------------------------------------- import

PICKLE_FILES = (
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "model.pt",
    "consolidated.00.pth",
)
INDEX_FILE = "model.safetensors.index.json"


def read_hf_config(dir: str | Path) -> tuple[str, Any, dict[str, Any]]:
    """(layout, our GPTConfig, the raw config.json) of a transformers folder; ValueError naming
    config.json and the key for anything llmctl cannot compute exactly."""
    path = Path(dir) / "config.json"
    if path.exists() or path.is_symlink():
        check_regular(path, "config.json")  # a pipe or device is refused, never opened
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"{path}: not found (a transformers model folder has a config.json)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a JSON object")
    model_type = raw.get("model_type")
    c = {k: v for k, v in raw.items() if k not in _META}

    def take(key: str, default: Any = KeyError) -> Any:
        if key in c:
            return c.pop(key)
        if default is KeyError:
            raise ValueError(f"{path}: key '{key}' is missing")
        return default

    def need(key: str, ok: Any, default: Any = None) -> None:
        value = take(key, default)
        allowed = ok if isinstance(ok, tuple) else (ok,)
        if value not in allowed:
            raise ValueError(
                f"{path}: key '{key}'={value!r} is not supported (llmctl computes only "
                f"{' or '.join(map(repr, allowed))})"
            )

    if model_type == "rwkv":
        return hf_rwkv.LAYOUT, hf_rwkv.read_config(path, c), raw
    if model_type == "gpt2":
        layout = "gpt2"
        d = take("n_embd")
        take("n_ctx", None)  # an old alias of n_positions, which decides
        need("activation_function", ("gelu_new", "gelu_pytorch_tanh"), "gelu_new")
        need("scale_attn_weights", True, True)
        need("scale_attn_by_inverse_layer_idx", False, False)
        take("reorder_and_upcast_attn", None)  # fp32 upcast inside attention: precision only
        fields = dict(
            vocab_size=take("vocab_size"), n_layer=take("n_layer"), n_head=take("n_head"),
            d_model=d, d_ff=take("n_inner", None) or 4 * d, max_seq_len=take("n_positions"),
            norm_eps=take("layer_norm_epsilon", 1e-5),
            tie_embeddings=take("tie_word_embeddings", True), **_GPT2,
        )  # fmt: skip
    elif model_type in ("llama", "mistral"):
        layout = "llama"
        need("hidden_act", "silu", "silu")
        need("pretraining_tp", 1, 1)
        d, n_head = take("hidden_size"), take("num_attention_heads")
        head_dim = take("head_dim", None)
        if head_dim is not None and head_dim * n_head != d:
            raise ValueError(
                f"{path}: key 'head_dim'={head_dim} is not supported (llmctl needs "
                f"hidden_size / num_attention_heads = {d // max(n_head, 1)})"
            )
        attn_bias, mlp_bias = take("attention_bias", False), take("mlp_bias", False)
        if attn_bias != mlp_bias:
            raise ValueError(
                f"{path}: key 'attention_bias'={attn_bias} with 'mlp_bias'={mlp_bias} is not "
                "supported (llmctl has biases on every linear layer or none)"
            )
        max_pos = take("max_position_embeddings")
        window = take("sliding_window", None)
        if window is not None and take("use_sliding_window", True) and window < max_pos:
            raise ValueError(
                f"{path}: key 'sliding_window'={window} is not supported (llmctl attends to the "
                "whole context); a null window or one >= max_position_embeddings is"
            )
        c.pop("use_sliding_window", None)
        c.pop("max_window_layers", None)
        fields = dict(
            vocab_size=take("vocab_size"), n_layer=take("num_hidden_layers"), n_head=n_head,
            n_kv_head=take("num_key_value_heads", None) or n_head, d_model=d,
            d_ff=take("intermediate_size"), max_seq_len=max_pos,
            norm_eps=take("rms_norm_eps", 1e-6), tie_embeddings=take("tie_word_embeddings", False),
            rope_theta=_rope_theta(path, c), bias=bool(attn_bias), **_LLAMA,
        )  # fmt: skip
    else:
        raise ValueError(
            f"{path}: key 'model_type'={model_type!r} is not supported "
            "(llmctl imports gpt2, llama, mistral and rwkv models)"
        )
    if c:
        raise ValueError(
            f"{path}: unknown key '{sorted(c)[0]}' for a {model_type} model "
            "(llmctl does not know whether it changes the computation)"
        )
    try:
        return layout, GPTConfig(**fields), raw
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def _rope_theta(path: Path, c: dict[str, Any]) -> float:
    """RoPE base from v4 `rope_theta` + `rope_scaling` or v5 `rope_parameters`; any scaling
    other than the default is refused by name."""
    theta = c.pop("rope_theta", None)
    for key in ("rope_scaling", "rope_parameters"):
        params = c.pop(key, None)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise ValueError(f"{path}: key '{key}' must be an object, got {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
        if kind != "default" or extra:
            raise ValueError(
                f"{path}: key '{key}'={params} is not supported (llmctl has plain RoPE only)"
            )
        if "rope_theta" in params:
            if theta is not None and params["rope_theta"] != theta:
                raise ValueError(
                    f"{path}: key '{key}.rope_theta'={params['rope_theta']} disagrees with "
                    f"'rope_theta'={theta}"
                )
            theta = params["rope_theta"]
    return float(10000.0 if theta is None else theta)


def weight_files(dir: str | Path) -> list[Path]:
    """The safetensors files of a transformers folder (one, or the shards its index names);
    ValueError for a pickle-only folder, saying why and how to convert it."""
    dir = Path(dir)
    single, index = dir / "model.safetensors", dir / INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            check_regular(index, "safetensors index")
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index}: not a safetensors index (needs a 'weight_map')") from None
        for f in files:
            if Path(f).name != f or not (dir / f).is_file():
                raise ValueError(f"{index}: shard {f!r} is missing")
        return [dir / f for f in files]
    pickled = [n for n in PICKLE_FILES if (dir / n).exists()]
    if pickled:
        raise ValueError(
            f"{dir / pickled[0]}: a pickle file, which can run code when it is loaded; llmctl "
            'reads only safetensors. Convert it where you trust it: python -c "from transformers '
            "import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{dir}').save_pretrained('{dir}-safetensors')\""
        )
    raise ValueError(f"{dir}: no model.safetensors or {INDEX_FILE}")


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if name in out:
                        raise ValueError(f"{f}: tensor {name} is in two shards")
                    out[name] = st.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def read_hf(dir: str | Path, dtype: torch.dtype | None = None) -> GPT:
    """Our GPT (eval mode) with the weights of a local transformers folder; `dtype` casts them
    (None: keep the stored dtype, float32 when the file mixes dtypes). ValueError naming the
    file and key or tensor for anything missing, unexpected, misshapen or non-finite."""
    dir = Path(dir)
    layout, cfg, _ = read_hf_config(dir)
    files = weight_files(dir)
    theirs = _read_tensors(files)
    where = files[0] if len(files) == 1 else dir / INDEX_FILE
    if layout == hf_rwkv.LAYOUT:
        with torch.device("meta"):
            rwkv = hf_rwkv.RWKV(cfg)
        dtypes = {t.dtype for t in theirs.values()}
        target = dtype or (dtypes.pop() if len(dtypes) == 1 else torch.float32)
        state = hf_rwkv.from_hf(rwkv, {k: v.to(target) for k, v in theirs.items()}, where)
        rwkv.load_state_dict(state, strict=False, assign=True)
        rwkv.tie_weights()
        return rwkv.eval()  # type: ignore[return-value]
    # buffers old transformers versions saved: causal masks, rotary inverse frequencies
    for name in [
        n for n in theirs if n.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))
    ]:
        del theirs[name]
    if layout == "gpt2":
        theirs = {("transformer." + k if not k.startswith(("transformer.", "lm_head.")) else k): v
                  for k, v in theirs.items()}  # fmt: skip
    with torch.device("meta"):
        model = GPT(cfg)
    want = hf_state_shapes(model)
    if cfg.tie_embeddings:
        head = theirs.pop("lm_head.weight", None)
        emb_name = "transformer.wte.weight" if layout == "gpt2" else "model.embed_tokens.weight"
        if head is not None and emb_name in theirs and not torch.equal(head, theirs[emb_name]):
            raise ValueError(
                f"{where}: lm_head.weight differs from {emb_name} but config.json says "
                "tie_word_embeddings=true"
            )
    missing = sorted(set(want) - set(theirs))
    unexpected = sorted(set(theirs) - set(want))
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {', '.join(missing[:5])}")
    if unexpected:
        raise ValueError(f"{where}: unexpected tensor(s) {', '.join(unexpected[:5])}")
    dtypes = {t.dtype for t in theirs.values()}
    target = dtype or (dtypes.pop() if len(dtypes) == 1 else torch.float32)
    for name, shape in want.items():
        t = theirs[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"{where}: tensor {name} is not finite floating point")
    state = _from_hf(cfg, layout, {k: v.to(target) for k, v in theirs.items()})
    model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    return model.eval()


def hf_state_shapes(model: GPT) -> dict[str, tuple[int, ...]]:
    """transformers' tensor names and shapes for `model` (a meta model is fine)."""
    return {k: tuple(v.shape) for k, v in _hf_named(model).items()}


def _from_hf(cfg: GPTConfig, layout: str, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `hf_state`."""
    if layout == "llama":
        inverse = {}
        with torch.device("meta"):
            names = [
                n
                for n in GPT(cfg).state_dict()
                if not (n == "lm_head.weight" and cfg.tie_embeddings)
            ]
        for ours in names:
            inverse[ours] = t[_llama_name(ours)]
        return inverse
    d = cfg.d_model
    out = {
        "tok_emb.weight": t["transformer.wte.weight"],
        "pos_emb.weight": t["transformer.wpe.weight"],
        "norm_f.weight": t["transformer.ln_f.weight"],
        "norm_f.bias": t["transformer.ln_f.bias"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = t["lm_head.weight"]
    for i in range(cfg.n_layer):
        b, p = f"blocks.{i}.", f"transformer.h.{i}."
        qkv_w = t[p + "attn.c_attn.weight"].T
        qkv_b = t[p + "attn.c_attn.bias"]
        out |= {
            b + "norm1.weight": t[p + "ln_1.weight"],
            b + "norm1.bias": t[p + "ln_1.bias"],
            b + "norm2.weight": t[p + "ln_2.weight"],
            b + "norm2.bias": t[p + "ln_2.bias"],
            b + "attn.q_proj.weight": qkv_w[:d],
            b + "attn.k_proj.weight": qkv_w[d : 2 * d],
            b + "attn.v_proj.weight": qkv_w[2 * d :],
            b + "attn.q_proj.bias": qkv_b[:d],
            b + "attn.k_proj.bias": qkv_b[d : 2 * d],
            b + "attn.v_proj.bias": qkv_b[2 * d :],
            b + "attn.o_proj.weight": t[p + "attn.c_proj.weight"].T,
            b + "attn.o_proj.bias": t[p + "attn.c_proj.bias"],
            b + "mlp.up_proj.weight": t[p + "mlp.c_fc.weight"].T,
            b + "mlp.up_proj.bias": t[p + "mlp.c_fc.bias"],
            b + "mlp.down_proj.weight": t[p + "mlp.c_proj.weight"].T,
            b + "mlp.down_proj.bias": t[p + "mlp.c_proj.bias"],
        }
    return {k: v.contiguous() for k, v in out.items()}


def save_hf(
    model: GPT, dir: str | Path, token_ids: dict[str, int | None] | None = None
) -> list[Path]:
    """Write `model.safetensors`, `config.json` and `generation_config.json` of the equivalent
    transformers model into `dir` (created); returns the paths. Tokenizer files and the model
    card are the caller's. ValueError when no transformers layout fits the model."""
    import os

    from safetensors.torch import save_file

    dir = Path(dir)
    state = hf_state(model)
    dtype = model.tok_emb.weight.dtype
    config = hf_config(model.config, dtype, token_ids)
    dir.mkdir(parents=True, exist_ok=True)
    weights = dir / "model.safetensors"
    save_file(state, weights, metadata={"format": "pt"})
    os.chmod(weights, 0o644)
    (dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {k: v for k, v in (token_ids or {}).items() if v is not None}
    (dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    return [weights, dir / "config.json", dir / "generation_config.json"]
