"""LoRA adapters on disk in PEFT's layout, under the module names of the base's transformers export.

An adapter directory holds `adapter_config.json` (PEFT's `LoraConfig` keys: `r`, `lora_alpha`,
`target_modules`, `use_rslora`, `rank_pattern`, `alpha_pattern`, `fan_in_fan_out`,
`base_model_name_or_path`, ...; plus llmctl's `base_checkpoint_digest`, the manifest digest of
the checkpoint it was trained on, and `llmctl_layout`) and `adapter_model.safetensors` with
`base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r].

`<module>` is the name the layer has in the transformers model `model/hf.py` builds from the
base (`maybe_hf_layout`): `model.layers.0.self_attn.q_proj` for a Llama-shaped GPT,
`transformer.h.0.attn.c_attn` for a GPT-2-shaped one, so `peft.PeftModel.from_pretrained` on
that export applies the adapter unchanged; `rwkv.blocks.0.attention.key` for an RWKV (layout
"rwkv", `model/hf_rwkv.py`; `target_modules` as `attention.key`, `feed_forward.key`, since
both mixes have a `key`). A GPT that maps onto none keeps our own module names
(`blocks.0.attn.q_proj`; layout "llmctl"). Layer shapes are read from the model type itself
(built on the meta device), so nothing here assumes one architecture's fields.

GPT-2 fuses q, k and v into one `c_attn` layer [3d, d]. Our separate q/k/v adapters (rank r
each) are written as the one stacked adapter that computes the same thing: lora_A is their A's
concatenated [3r, d] and lora_B is block-diagonal [3d, 3r] (zero rows for a projection that
is not targeted); `rank_pattern` and `alpha_pattern` record c_attn's rank 3r and an alpha that
keeps the scale alpha/r (alpha * sqrt(3) under rsLoRA). Reading splits B's rows back.

Example:
    >>> save_adapter(out, model, base_digest=ckpt.digest, base_path=ckpt.path)
    >>> merge_adapter(base, out, base_digest=ckpt.digest)   # W += B @ A * scale
    ['blocks.0.attn.k_proj', ...]
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llmctl.files import check_regular
from llmctl.model import hf_rwkv
from llmctl.model.hf import hf_module_names, maybe_hf_layout
from llmctl.model.lora import add_lora, lora_layers, lora_settings

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DIGEST_KEY = "base_checkpoint_digest"
LAYOUT_KEY = "llmctl_layout"
PREFIX = "base_model.model."
# The transformers target name of each of ours (suffixes PEFT matches against module names).
GPT2_TARGETS = {
    "q_proj": "c_attn", "k_proj": "c_attn", "v_proj": "c_attn", "o_proj": "attn.c_proj",
    "up_proj": "c_fc", "down_proj": "mlp.c_proj", "lm_head": "lm_head",
}  # fmt: skip


def layout_of(config: Any) -> str:
    """ "llama", "gpt2" (the transformers architecture a GPT with `config` exports to) or
    "llmctl" (none: our own module names)."""
    return maybe_hf_layout(config) or "llmctl"


def module_names(config: Any) -> dict[str, tuple[str, slice | None]]:
    """Our Linear module name -> (its name in the adapter file, rows of that module that are
    ours or None). The inverse is `grouped(module_names(config))`."""
    from llmctl.model.io import build_model

    names = hf_module_names(config)
    if names:
        return names
    # no transformers layout: our own names, every Linear of the model type (meta: no weights)
    with torch.device("meta"):
        model = build_model(config)
    ours = [n for n, m in model.named_modules() if type(m) is nn.Linear and n != "lm_head"]
    return {n: (n, None) for n in [*ours, "lm_head"]}


def grouped(
    names: dict[str, tuple[str, slice | None]],
) -> dict[str, list[tuple[str, slice | None]]]:
    """The other direction: file module name -> [(our module name, rows)], in model order."""
    out: dict[str, list[tuple[str, slice | None]]] = {}
    for ours, (theirs, rows) in names.items():
        out.setdefault(theirs, []).append((ours, rows))
    return out


def _target_name(ours: str, layout: str) -> str:
    short = ours.rsplit(".", 1)[-1]
    if layout == hf_rwkv.LAYOUT:  # attention.key and feed_forward.key are different layers
        return hf_rwkv.target_name(hf_rwkv.hf_name(ours))
    return GPT2_TARGETS[short] if layout == "gpt2" else short


def to_peft(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config keys) of `model`'s LoRA layers in PEFT's layout: tensor names under
    the transformers export's module names, and `r`, `lora_alpha`, `use_rslora`,
    `target_modules`, `rank_pattern`, `alpha_pattern`, `fan_in_fan_out`, `llmctl_layout`."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers to save")
    s = lora_settings(model)
    r, alpha, rslora = s["r"], s["alpha"], s["rslora"]
    layout = layout_of(model.config)
    names = module_names(model.config)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for theirs, members in grouped(names).items():
        mine = [(ours, rows) for ours, rows in members if ours in layers]
        if not mine:
            continue
        if len(members) == 1:
            a, b = layers[mine[0][0]].lora_A.weight, layers[mine[0][0]].lora_B.weight
        else:  # GPT-2's c_attn: stack A's, B block-diagonal over the output rows of each
            out_f = max(rows.stop for _, rows in members if rows is not None)
            a = torch.cat([layers[o].lora_A.weight for o, _ in mine])
            b = a.new_zeros(out_f, r * len(mine))
            for j, (o, rows) in enumerate(mine):
                b[rows, j * r : (j + 1) * r] = layers[o].lora_B.weight
            k = len(mine)
            rank_pattern[_target_name(mine[0][0], layout)] = r * k
            # keep the scale: alpha/r == alpha'/(k r), or alpha/sqrt(r) == alpha'/sqrt(k r)
            alpha_pattern[_target_name(mine[0][0], layout)] = alpha * (
                math.sqrt(k) if rslora else k
            )
        tensors[f"{PREFIX}{theirs}.lora_A.weight"] = a.detach().float().cpu().contiguous()
        tensors[f"{PREFIX}{theirs}.lora_B.weight"] = b.detach().float().cpu().contiguous()
    missing = sorted(set(layers) - set(names))
    if missing:
        raise ValueError(f"LoRA layer(s) {', '.join(missing)} have no name in the {layout} layout")
    targets = sorted({_target_name(o, layout) for o in layers})
    config = {
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": layout == "gpt2",  # GPT-2's Conv1D stores weights [in, out]
        LAYOUT_KEY: layout,
    }
    return tensors, config


def save_adapter(
    dir: Path | str,
    model: nn.Module,
    *,
    base_digest: str,
    base_path: str,
    dropout: float = 0.0,
) -> dict[str, Any]:
    """Write `adapter_model.safetensors` and `adapter_config.json` for `model`'s LoRA layers
    into `dir` (the caller publishes it atomically); returns the config written. Refuses
    non-finite adapter weights before writing anything."""
    tensors, keys = to_peft(model)
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"adapter tensor(s) {', '.join(bad)} have NaN or infinite values")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_path,
        **keys,
        "lora_dropout": dropout,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        DIGEST_KEY: base_digest,
    }
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS_FILE, metadata={"format": "pt"})
    os.chmod(out / WEIGHTS_FILE, 0o644)  # safetensors creates it 0600
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config


def read_adapter_config(dir: Path | str) -> dict[str, Any]:
    """`adapter_config.json`, checked: peft_type LORA, r > 0, lora_alpha a number,
    target_modules given, bias none."""
    path = Path(dir) / CONFIG_FILE
    if path.exists() or path.is_symlink():
        check_regular(path, "adapter config")  # a pipe or device is refused, never opened
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: not found (not a PEFT adapter directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg['peft_type']!r} is not LORA")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not _positive_int(r):
        raise ValueError(f"{path}: 'r' must be a positive integer, got {r!r}")
    if not _number(alpha):
        raise ValueError(f"{path}: 'lora_alpha' must be a number, got {alpha!r}")
    for key, check in (("rank_pattern", _positive_int), ("alpha_pattern", _number)):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(check(v) for v in pattern.values()):
            raise ValueError(f"{path}: '{key}' must map module names to numbers")
    if not cfg.get("target_modules"):
        raise ValueError(f"{path}: 'target_modules' is missing")
    if cfg.get("bias", "none") != "none" or cfg.get("use_dora"):
        raise ValueError(f"{path}: only plain LoRA (bias='none', no DoRA) can be merged")
    return cfg


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _targeted(name: str, targets: str | list[str]) -> bool:
    # PEFT's rule: a string is a full-match regex; a list matches a name or a name's suffix
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _pattern(pattern: dict[str, Any], name: str, default: Any) -> Any:
    # PEFT's get_pattern_key: the first key that matches the end of the module name
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_adapter(
    dir: Path | str, config: Any, base_digest: str
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Our module name -> (A [r, in], B [out, r], scale) of the adapter in `dir`, for a model
    (any registered type) with `config` whose checkpoint digest is `base_digest`. A fused
    transformers layer (GPT-2's c_attn) becomes one entry per projection: the shared A and
    B's rows for it.
    ValueError (naming the file and tensor) for a foreign base, a module the layout does not
    have or that is not targeted, a tensor that is missing, misshapen or not finite."""
    dir = Path(dir)
    cfg = read_adapter_config(dir)
    recorded = cfg.get(DIGEST_KEY)
    if recorded != base_digest:
        what = "records no base checkpoint" if recorded is None else f"was trained on {recorded}"
        raise ValueError(
            f"{dir / CONFIG_FILE}: adapter {what}, but this checkpoint's digest is {base_digest}"
        )
    layout = layout_of(config)
    if cfg.get(LAYOUT_KEY, layout) != layout:
        raise ValueError(
            f"{dir / CONFIG_FILE}: {LAYOUT_KEY} is {cfg[LAYOUT_KEY]!r} but this checkpoint's "
            f"layout is {layout!r}"
        )
    path = dir / WEIGHTS_FILE
    try:
        tensors = load_file(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if key.startswith(PREFIX) and key.endswith(suffix):
                pairs.setdefault(key[len(PREFIX) : -len(suffix)], {})[part] = t
                break
        else:
            raise ValueError(f"{path}: unexpected tensor {key} (only LoRA A/B weights merge)")
    names = module_names(config)
    theirs = grouped(names)
    tied = getattr(config, "tie_embeddings", False)
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name, pair in sorted(pairs.items()):
        where = f"{path}: {name}"
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{where}: needs both lora_A and lora_B")
        if name not in theirs:
            raise ValueError(
                f"{where}: the model has no linear layer of that name ({layout} layout)"
            )
        if not _targeted(name, cfg["target_modules"]):
            raise ValueError(f"{where}: not in target_modules {cfg['target_modules']}")
        if tied and name == "lm_head":
            raise ValueError(f"{where}: lm_head is tied to the embedding; cannot merge into it")
        r = _pattern(cfg.get("rank_pattern") or {}, name, cfg["r"])
        alpha = _pattern(cfg.get("alpha_pattern") or {}, name, cfg["lora_alpha"])
        scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
        a, b = pair["lora_A"], pair["lora_B"]
        members = theirs[name]
        in_f, out_f = _features_of(config, members)
        if a.shape != (r, in_f) or b.shape != (out_f, r):
            raise ValueError(
                f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                f"[r={r}, {in_f}] / [{out_f}, r={r}]"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"{where}: NaN or infinite values")
        for ours, rows in members:
            if rows is None:
                out[ours] = (a, b, scale)
            elif b[rows].any():  # all-zero rows: a projection of c_attn that was not adapted
                out[ours] = (a, b[rows], scale)
    return out


def _features_of(config: Any, members: list[tuple[str, slice | None]]) -> tuple[int, int]:
    """(in, out) features of the file's module that holds `members` (our Linear layers), read
    from the model type's own layers (built on the meta device: no weights, any model type).
    A fused module (GPT-2's c_attn) has its members' input and their rows stacked."""
    from llmctl.model.io import build_model

    with torch.device("meta"):
        modules = dict(build_model(config).named_modules())
    first = modules[members[0][0]]
    out_f = (
        max(rows.stop for _, rows in members if rows is not None)
        if len(members) > 1
        else first.out_features
    )
    return first.in_features, out_f


def merge_adapter(model: nn.Module, dir: Path | str, base_digest: str) -> list[str]:
    """Add the adapter in `dir` into `model`'s Linear weights in place (`W += B @ A * scale`,
    computed in float64); returns the names of the layers changed. The one merge of llmctl:
    `lora --merge` and `generate --adapter` both call it. Errors as `read_adapter`."""
    deltas = read_adapter(dir, model.config, base_digest)
    modules = dict(model.named_modules())
    for name in deltas:
        w = getattr(modules.get(name), "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise ValueError(
                f"{Path(dir) / WEIGHTS_FILE}: {name} has no floating-point weight to merge into"
            )
    with torch.no_grad():
        for name, (a, b, scale) in deltas.items():
            w = modules[name].weight
            delta = b.double() @ a.double() * scale
            w.add_(delta.to(device=w.device, dtype=w.dtype))
    return sorted(deltas)


def load_adapter(model: nn.Module, dir: Path | str, base_digest: str) -> list[str]:
    """Give `model` the adapter in `dir` as live LoRA layers (unmerged, adapters trainable,
    the rest frozen, no dropout), e.g. to evaluate it on a quantized base or to continue from
    it; returns the layers adapted. A fused layer of the file (GPT-2's c_attn) gives each of
    its projections the shared A and its rows of B, so outputs equal the merged model's."""
    deltas = read_adapter(dir, model.config, base_digest)
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    for name, (a, b, scale) in deltas.items():
        layer = add_lora(modules[name], r=a.shape[0], alpha=1.0, name=name)
        layer.scaling = scale
        layer.lora_alpha = scale * layer.r  # what alpha / r gives this scale
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
    return sorted(deltas)
