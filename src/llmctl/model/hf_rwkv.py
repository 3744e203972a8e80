"""Our RWKV-4 in transformers' `RwkvForCausalLM` layout, both ways, without transformers at run
time (`model/hf.py` dispatches here for an `RWKVConfig`).

transformers' `RwkvModel` is RWKV-4 as `model/rwkv.py` computes it: the same token shift
(of the LN1/LN2 outputs), the same WKV with decay `exp(-exp(time_decay))` and bonus
`time_first` (both stored as the raw parameters, as ours: copied unchanged), squared-ReLU
channel mixing, `pre_ln` on the embeddings in block 0. The names differ:

    tok_emb                 rwkv.embeddings
    blocks.0.ln0            rwkv.blocks.0.pre_ln
    blocks.i.ln1 / ln2      rwkv.blocks.i.ln1 / ln2
    blocks.i.att.X          rwkv.blocks.i.attention.X    (time_mix_k -> time_mix_key, ...)
    blocks.i.ffn.X          rwkv.blocks.i.feed_forward.X
    norm_f                  rwkv.ln_out
    lm_head                 head

and the `time_mix_*` vectors are [1, 1, d] there. Two facts of transformers' RWKV bound what
fits: `ln_out` is built with LayerNorm's default eps (1e-5) whatever `layer_norm_epsilon`
says, so a model with another `norm_eps` is refused; and `rescale_every` (an fp16 overflow
guard that halves the residual stream every N layers at inference) is written as 0, so
transformers computes the function as trained.

Example:
    >>> cfg, tensors = hf_config(model.config), hf_state(model)   # export
    >>> model = read_hf_rwkv("path/to/rwkv-4-169m-pile")          # import
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmctl.model.rwkv import RWKV, RWKVConfig

if TYPE_CHECKING:
    from transformers import RwkvForCausalLM

LAYOUT = "rwkv"
_MIX = {"time_mix_k": "time_mix_key", "time_mix_v": "time_mix_value",
        "time_mix_r": "time_mix_receptance"}  # fmt: skip
# transformers' ln_out is nn.LayerNorm(hidden_size): eps fixed at torch's default
LN_OUT_EPS = 1e-5


def check(cfg: RWKVConfig) -> None:
    """ValueError unless transformers' RWKV computes exactly what `cfg` does."""
    if cfg.norm_eps != LN_OUT_EPS:
        raise ValueError(
            f"transformers' RwkvForCausalLM fixes its final LayerNorm's eps at {LN_OUT_EPS}; "
            f"this model has norm_eps={cfg.norm_eps}"
        )


def hf_config(
    cfg: RWKVConfig, dtype: torch.dtype = torch.float32, token_ids: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The `config.json` of the equivalent `RwkvForCausalLM`."""
    check(cfg)
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(token_ids or {})}
    name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["RwkvForCausalLM"],
        "model_type": "rwkv",
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_seq_len,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "attention_hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "layer_norm_epsilon": cfg.norm_eps,
        "rescale_every": 0,
        **ids,
        "tie_word_embeddings": cfg.tie_embeddings,
        "use_cache": True,
        "dtype": name,
        "torch_dtype": name,
    }


def hf_name(ours: str) -> str:
    """transformers' name of one of our parameter (or module) names."""
    if ours.startswith("tok_emb"):
        return "rwkv.embeddings" + ours.removeprefix("tok_emb")
    if ours.startswith("norm_f"):
        return "rwkv.ln_out" + ours.removeprefix("norm_f")
    if ours.startswith("lm_head"):
        return "head" + ours.removeprefix("lm_head")
    m = re.fullmatch(r"blocks\.(\d+)\.(\w+)(?:\.(\w+))?(?:\.(\w+))?", ours)
    if m is None:
        raise ValueError(f"{ours}: no RwkvForCausalLM name")
    i, part, rest = m.group(1), m.group(2), [x for x in m.groups()[2:] if x]
    part = {"ln0": "pre_ln", "att": "attention", "ffn": "feed_forward"}.get(part, part)
    rest = [_MIX.get(x, x) for x in rest]
    return ".".join([f"rwkv.blocks.{i}", part, *rest])


def _names(model: RWKV) -> dict[str, str]:
    skip = "lm_head.weight" if model.config.tie_embeddings else None
    return {k: hf_name(k) for k in model.state_dict() if not k.startswith("aux.") and k != skip}


def hf_state(model: RWKV) -> dict[str, torch.Tensor]:
    """`model`'s weights under transformers' names and shapes (contiguous, on the CPU)."""
    check(model.config)
    state = model.state_dict()
    out = {}
    for ours, theirs in _names(model).items():
        t = state[ours].detach()
        if ".time_mix_" in ours:
            t = t.reshape(1, 1, -1)
        out[theirs] = t.cpu().contiguous()
    return out


def module_names(cfg: RWKVConfig) -> dict[str, tuple[str, slice | None]]:
    """Every Linear layer of an RWKV with `cfg` -> (transformers' module name, None)."""
    out: dict[str, tuple[str, slice | None]] = {}
    for i in range(cfg.n_layer):
        for part, names in (("att", ("key", "value", "receptance", "output")),
                            ("ffn", ("key", "value", "receptance"))):  # fmt: skip
            for n in names:
                ours = f"blocks.{i}.{part}.{n}"
                out[ours] = (hf_name(ours), None)
    out["lm_head"] = ("head", None)
    return out


def target_name(theirs: str) -> str:
    """The PEFT `target_modules` entry of a transformers module name: the part after the
    block ("attention.key", "feed_forward.value"), or "head"."""
    m = re.fullmatch(r"rwkv\.blocks\.\d+\.(.+)", theirs)
    return m.group(1) if m else theirs


# ----------------------------------------------------------------------------- import

# config.json keys of an RwkvForCausalLM that do not change what it computes
_IGNORED = {"rescale_every", "use_cache", "context_length"}


def read_config(path: Path, c: dict[str, Any]) -> RWKVConfig:
    """Our RWKVConfig from the (meta keys removed) config dict `c` of `path`; ValueError
    naming the key for anything we cannot compute exactly."""
    c = dict(c)
    c.pop("model_type", None)

    def take(key: str, default: Any = KeyError) -> Any:
        if key in c:
            return c.pop(key)
        if default is KeyError:
            raise ValueError(f"{path}: key '{key}' is missing")
        return default

    d = take("hidden_size")
    attention = take("attention_hidden_size", None)
    if attention not in (None, d):
        raise ValueError(f"{path}: key 'attention_hidden_size' = {attention} != hidden_size {d}")
    eps = take("layer_norm_epsilon", LN_OUT_EPS)
    if eps != LN_OUT_EPS:
        raise ValueError(
            f"{path}: key 'layer_norm_epsilon' = {eps}: transformers' ln_out uses {LN_OUT_EPS} "
            "and llmctl's RWKV one eps for every norm"
        )
    ctx = c.get("context_length", 1024)
    kw = dict(
        vocab_size=take("vocab_size"),
        n_layer=take("num_hidden_layers"),
        d_model=d,
        d_ff=take("intermediate_size", None) or 4 * d,
        max_seq_len=int(ctx),
        tie_embeddings=bool(take("tie_word_embeddings", False)),
    )
    for key in _IGNORED:
        c.pop(key, None)
    if c:
        raise ValueError(f"{path}: key(s) {', '.join(sorted(c))} not understood for rwkv")
    try:
        return RWKVConfig(**kw)  # type: ignore[arg-type]
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def from_hf(model: RWKV, theirs: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """Our state dict from transformers' tensors (names and shapes checked against `model`,
    a meta model is fine); ValueError naming `where` and the tensor."""
    names = _names(model)
    want = set(names.values())
    if model.config.tie_embeddings:
        theirs = {k: v for k, v in theirs.items() if k != "head.weight"}
    missing, unexpected = sorted(want - set(theirs)), sorted(set(theirs) - want)
    if missing:
        raise ValueError(f"{where}: missing tensor(s) {', '.join(missing[:5])}")
    if unexpected:
        raise ValueError(f"{where}: unexpected tensor(s) {', '.join(unexpected[:5])}")
    state = model.state_dict()
    out = {}
    for ours, name in names.items():
        t = theirs[name]
        shape = tuple(state[ours].shape)
        if ".time_mix_" in ours and tuple(t.shape) == (1, 1, *shape):
            t = t.reshape(shape)
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: tensor {name} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"{where}: tensor {name} is not finite floating point")
        out[ours] = t.contiguous()
    return out


def to_hf_rwkv(model: RWKV) -> RwkvForCausalLM:
    """A `transformers.RwkvForCausalLM` with `model`'s weights (eval mode, same dtype; tests)."""
    from transformers import RwkvConfig, RwkvForCausalLM

    cfg = hf_config(model.config)
    for key in ("architectures", "model_type", "dtype", "torch_dtype"):
        del cfg[key]
    hf = RwkvForCausalLM(RwkvConfig(**cfg))
    weight = model.tok_emb.weight
    hf.to(device=weight.device, dtype=weight.dtype)
    sd = hf_state(model)
    if model.config.tie_embeddings:
        sd["head.weight"] = sd["rwkv.embeddings.weight"]
    hf.load_state_dict(sd, strict=True)
    return hf.eval()
