"""Merge a LoRA adapter in PEFT layout into a loaded model: `W += B @ A * lora_alpha / r`.

An adapter directory holds `adapter_config.json` (PEFT keys `r`, `lora_alpha`,
`target_modules`, optional `use_rslora`, plus llmctl's `base_checkpoint_digest`: the manifest
digest of the checkpoint it was trained on) and `adapter_model.safetensors` with tensors
`base_model.model.<module path>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r].
An adapter is refused unless its recorded base digest equals the given checkpoint's.

Example:
    >>> merge_adapter(model, Path("out/lora"), base_digest=open_artifact(ckpt, "checkpoint").digest)
    ['blocks.0.attn.q_proj', ...]
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DIGEST_KEY = "base_checkpoint_digest"
PREFIX = "base_model.model."


def read_adapter_config(dir: Path) -> dict[str, Any]:
    """`adapter_config.json`, checked: r > 0, lora_alpha a number, target_modules given."""
    path = Path(dir) / CONFIG_FILE
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
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{path}: 'r' must be a positive integer, got {r!r}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool):
        raise ValueError(f"{path}: 'lora_alpha' must be a number, got {alpha!r}")
    if not cfg.get("target_modules"):
        raise ValueError(f"{path}: 'target_modules' is missing")
    if cfg.get("fan_in_fan_out") or cfg.get("bias", "none") != "none":
        raise ValueError(f"{path}: only fan_in_fan_out=false and bias='none' can be merged")
    return cfg


def _targeted(name: str, targets: str | list[str]) -> bool:
    # PEFT's rule: a string is a full-match regex; a list matches a name or a name's suffix
    if isinstance(targets, str):
        import re

        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def merge_adapter(model: nn.Module, dir: Path | str, base_digest: str) -> list[str]:
    """Add every LoRA pair of the adapter in `dir` into `model`'s linears, in place; returns
    the merged module names. ValueError (naming the file and tensor) for a foreign base, a
    module that is not targeted or not a linear, a shape mismatch or a non-finite tensor."""
    dir = Path(dir)
    cfg = read_adapter_config(dir)
    recorded = cfg.get(DIGEST_KEY)
    if recorded != base_digest:
        what = "records no base checkpoint" if recorded is None else f"was trained on {recorded}"
        raise ValueError(
            f"{dir / CONFIG_FILE}: adapter {what}, but this checkpoint's digest is {base_digest}"
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
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (math.sqrt(r) if cfg.get("use_rslora") else r)
    modules = dict(model.named_modules())
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    for name, pair in sorted(pairs.items()):
        where = f"{path}: {name}"
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{where}: needs both lora_A and lora_B")
        linear = modules.get(name)
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{where}: the model has no linear layer of that name")
        if not _targeted(name, cfg["target_modules"]):
            raise ValueError(f"{where}: not in target_modules {cfg['target_modules']}")
        if tied and name == "lm_head":
            raise ValueError(f"{where}: lm_head is tied to the embedding; cannot merge into it")
        a, b = pair["lora_A"], pair["lora_B"]
        out_f, in_f = linear.weight.shape
        if a.shape != (r, in_f) or b.shape != (out_f, r):
            raise ValueError(
                f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                f"[r={r}, {in_f}] / [{out_f}, r={r}]"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"{where}: NaN or infinite values")
    with torch.no_grad():
        for name, pair in pairs.items():
            w = modules[name].weight
            delta = pair["lora_B"].double() @ pair["lora_A"].double() * scale
            w.add_(delta.to(device=w.device, dtype=w.dtype))
    return sorted(pairs)
