"""Checkpoints on disk: `model.safetensors` + `config.json` (+ tokenizer files from callers).

The layout follows Hugging Face conventions (tied lm head stored once, as `tok_emb.weight`;
`config.json` with `model_type` and `architectures`). Nothing is unpickled: tensors come
through safetensors, metadata through JSON, and every tensor is checked for name, shape,
dtype and finiteness before the model is built.

Two tables make the format extensible without branches here:
- model types: `register_model("llmctl-gpt", GPTConfig, GPT)`; `config.json`'s `model_type`
  picks the classes (RWKV registers its own). A model class follows the contract in
  `model/contract.py`.
- module swaps: `register_swap("quantization", apply, describe)`. A checkpoint whose
  `config.json` holds a `quantization` (or `lora`, ...) block is rebuilt by calling
  `apply(model, block)` on the model (built on the meta device) before its weights load, so
  swapped Linear layers (quantized, LoRA) come back as they were saved; `describe(model)`
  writes the block at save time (None when the model has no such modules).

Example:
    >>> save_checkpoint(tmp / "ckpt", model, {"tokenizer.json": tok_path})
    >>> model = load_model(tmp / "ckpt", device="cuda", dtype=torch.bfloat16)
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from llmctl.errors import CheckpointError
from llmctl.model.gpt import GPT, GPTConfig
from llmctl.model.rwkv import RWKV, RWKVConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MODEL_TYPE = "llmctl-gpt"
_META_KEYS = ("model_type", "architectures", "dtype")


@dataclass(frozen=True)
class ModelType:
    """One registered architecture: `config.json`'s `model_type` → config and model classes."""

    name: str
    config_cls: type
    model_cls: type
    architectures: tuple[str, ...]


@dataclass(frozen=True)
class Swap:
    """Module swaps recorded in a `config.json` block (see the module docstring)."""

    key: str
    apply: Callable[[nn.Module, dict[str, Any]], None]
    describe: Callable[[nn.Module], dict[str, Any] | None]


MODEL_TYPES: dict[str, ModelType] = {}
SWAPS: dict[str, Swap] = {}
# Where the swaps live: imported when a checkpoint needs them (model/ stays light to import).
SWAP_MODULES = {"quantization": "llmctl.model.quant", "lora": "llmctl.model.lora"}


def register_model(
    name: str, config_cls: type, model_cls: type, architectures: tuple[str, ...] = ()
) -> None:
    """Make `load_model` build `model_cls(config_cls.from_dict(...))` for `model_type: name`."""
    MODEL_TYPES[name] = ModelType(
        name, config_cls, model_cls, architectures or (model_cls.__name__,)
    )


def register_swap(
    key: str,
    apply: Callable[[nn.Module, dict[str, Any]], None],
    describe: Callable[[nn.Module], dict[str, Any] | None],
) -> None:
    """Record and rebuild module swaps through the `config.json` block named `key`."""
    SWAPS[key] = Swap(key, apply, describe)


def _swaps() -> dict[str, Swap]:
    for module in SWAP_MODULES.values():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise  # the module exists but something it needs is missing: a real error
    return SWAPS


def model_type_of(model: nn.Module) -> ModelType:
    """The registered type of a model instance (ValueError for an unregistered class)."""
    for t in MODEL_TYPES.values():
        if type(model) is t.model_cls:
            return t
    raise ValueError(f"{type(model).__name__} is not a registered model type")


register_model(MODEL_TYPE, GPTConfig, GPT, ("LlmctlGPT",))
register_model("llmctl-rwkv", RWKVConfig, RWKV, ("LlmctlRWKV",))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _saved_state(model: nn.Module) -> dict[str, torch.Tensor]:
    # A tied lm head shares storage with the token embedding; safetensors refuses shared
    # storage, and HF stores the tie once too, so it is dropped here and re-tied on load.
    # Trainable extras (`aux.*`: a distillation projection, a value head) never ship.
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("aux.")}
    if getattr(model.config, "tie_embeddings", False) and "lm_head.weight" in state:
        del state["lm_head.weight"]
    return state


def save_checkpoint(
    dir: str | Path, model: nn.Module, extra_files: dict[str, Path | bytes] | None = None
) -> Path:
    """Write `model.safetensors` and `config.json` into `dir` (created if needed), plus each
    `extra_files` entry: name -> a file to copy or the bytes to write. Returns `dir`.
    Refuses (ValueError) a model with non-finite weights, before writing anything.
    The caller makes the directory's publication atomic (see artifacts.py)."""
    out = Path(dir)
    mtype = model_type_of(model)
    state = {k: v.detach().contiguous().cpu() for k, v in _saved_state(model).items()}
    # Floating tensors share one dtype (config.json's `dtype`); integer ones (quantized
    # weights) keep theirs, which the model rebuilt from config.json expects.
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"save_checkpoint: model mixes dtypes {sorted(map(str, dtypes))}")
    # safetensors stores NaN/Inf without complaint; a model that holds them is broken, and
    # load_model would refuse it later, far from the cause. Checked before anything is written.
    bad = [k for k, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ValueError(f"save_checkpoint: tensor(s) {', '.join(bad)} have NaN or infinite values")
    out.mkdir(parents=True, exist_ok=True)
    for name, src in (extra_files or {}).items():
        if name in (WEIGHTS_FILE, CONFIG_FILE) or Path(name).name != name:
            raise ValueError(f"save_checkpoint: bad extra file name {name!r}")
        if isinstance(src, bytes):
            (out / name).write_bytes(src)
        else:
            shutil.copyfile(src, out / name)
    save_file(state, out / WEIGHTS_FILE, metadata={"format": "pt"})
    # safetensors creates the file private (0600); a published model is as readable as its
    # config.json next to it.
    os.chmod(out / WEIGHTS_FILE, 0o644)
    config = {
        **model.config.to_dict(),
        "model_type": mtype.name,
        "architectures": list(mtype.architectures),
        "dtype": _dtype_name(dtypes.pop()),
    }
    for swap in _swaps().values():
        block = swap.describe(model)
        if block is not None:
            config[swap.key] = block
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return out


def _read_config(dir: Path) -> dict[str, Any]:
    path = dir / CONFIG_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if data.get("model_type") not in MODEL_TYPES:
        known = ", ".join(sorted(MODEL_TYPES))
        raise ValueError(f"{path}: model_type {data.get('model_type')!r} is not one of {known}")
    return data


def load_config(dir: str | Path) -> Any:
    """The model config stored in `dir/config.json` (a GPTConfig, or the registered type's);
    ValueError naming the file if it is bad."""
    path = Path(dir) / CONFIG_FILE
    data = _read_config(Path(dir))
    mtype = MODEL_TYPES[data["model_type"]]
    skip = set(_META_KEYS) | set(_swaps())
    try:
        return mtype.config_cls.from_dict({k: v for k, v in data.items() if k not in skip})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


ARCHS = ("gpt", "rwkv")


def model_config(preset: str, overrides: dict[str, Any], vocab_size: int, *,
                 masked: bool = False) -> GPTConfig | RWKVConfig:  # fmt: skip
    """The config of a fresh model (what `pretrain` and a `distill` student build): the named
    preset, then the `model.*` overrides; the vocab from the tokenizer; `masked` (the mlm
    objective) makes it bidirectional unless `causal` is given. The architecture is
    `overrides["arch"]`, else the preset's. A bad key or value is a ValueError naming the key.

    Example: model_config("small", {"n_layer": 4, "pos": "alibi"}, vocab_size=8192)"""
    from llmctl.model import gpt, rwkv

    presets = {**{n: gpt for n in gpt.PRESETS}, **{n: rwkv for n in rwkv.PRESETS}}
    overrides = dict(overrides)
    arch = overrides.pop("arch", "rwkv" if preset in rwkv.PRESETS else "gpt")
    if arch not in ARCHS:
        raise ValueError(f"config key 'model.arch': {arch!r} is not one of {', '.join(ARCHS)}")
    name = preset
    if arch == "rwkv" and name in gpt.PRESETS and f"rwkv-{name}" in rwkv.PRESETS:
        name = f"rwkv-{name}"  # --set model.arch=rwkv with the default preset
    if name not in presets:
        raise ValueError(f"config key 'preset': {preset!r} is not one of {', '.join(presets)}")
    module = presets[name]
    if (module is rwkv) != (arch == "rwkv"):
        raise ValueError(f"config key 'model.arch': {arch!r} does not fit preset {name!r}")
    if "vocab_size" in overrides:
        raise ValueError("config key 'model.vocab_size': set by the tokenizer, not configurable")
    if masked:
        if arch == "rwkv":
            raise ValueError("config key 'objective': an RWKV model is causal; mlm needs a GPT")
        overrides.setdefault("causal", False)
    try:
        return module.preset(name, **overrides, vocab_size=vocab_size)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config key 'model': {e}") from e


def build_model(config: Any, blocks: dict[str, Any] | None = None) -> nn.Module:
    """A model of `config`'s registered type with the swaps of `blocks` ({"quantization":
    {...}}) applied, on the current default device (use `torch.device("meta")` to defer)."""
    mtype = next((t for t in MODEL_TYPES.values() if type(config) is t.config_cls), None)
    if mtype is None:
        raise ValueError(f"{type(config).__name__} is not a registered model config")
    model = mtype.model_cls(config)
    for key, block in (blocks or {}).items():
        _swaps()[key].apply(model, block)
    return model


# safetensors' own cap on the JSON header; a larger length field is refused before parsing.
MAX_SAFETENSORS_HEADER = 100_000_000


def check_safetensors(path: Path) -> None:
    """Refuse (ValueError naming the file) a safetensors file whose 8-byte header length does
    not fit in the file (truncated, or over-claiming), before safetensors parses anything."""
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    if len(head) < 8:
        raise ValueError(f"{path}: not a readable safetensors file ({size} bytes, no header)")
    n = int.from_bytes(head, "little")
    if n > size - 8 or n > MAX_SAFETENSORS_HEADER:
        raise ValueError(
            f"{path}: not a readable safetensors file (header length {n:,} but "
            f"{size - 8:,} bytes follow it: truncated or not safetensors)"
        )


def load_model(
    dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Any:
    """Build the model saved in `dir` on `device` (cast to `dtype` if given), in eval mode.
    Raises CheckpointError (a ValueError; a usage error at the CLI) naming the file, key or
    tensor for a bad config or a missing, unexpected, misshapen, wrongly typed or non-finite
    tensor."""
    try:
        return _load_model(Path(dir), device, dtype)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _load_model(dir: Path, device: torch.device | str, dtype: torch.dtype | None) -> Any:
    config = load_config(dir)
    data = _read_config(dir)
    saved_dtype = data.get("dtype")
    path = dir / WEIGHTS_FILE
    blocks = {k: data[k] for k in _swaps() if k in data}
    with torch.device("meta"):
        model = build_model(config, blocks)
    expected = {
        k: (tuple(v.shape), saved_dtype if v.is_floating_point() else _dtype_name(v.dtype))
        for k, v in _saved_state(model).items()
    }
    state: dict[str, torch.Tensor] = {}
    check_safetensors(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = set(f.keys())
            missing = sorted(set(expected) - keys)
            unexpected = sorted(keys - set(expected))
            if missing:
                raise ValueError(f"{path}: missing tensor(s) {', '.join(missing)}")
            if unexpected:
                raise ValueError(f"{path}: unexpected tensor(s) {', '.join(unexpected)}")
            for name, (shape, dtype_name) in expected.items():
                sl = f.get_slice(name)
                got = tuple(sl.get_shape())
                if got != shape:
                    raise ValueError(f"{path}: tensor {name} has shape {got}, expected {shape}")
                tensor = f.get_tensor(name)
                if _dtype_name(tensor.dtype) != dtype_name:
                    raise ValueError(
                        f"{path}: tensor {name} is {_dtype_name(tensor.dtype)}, "
                        f"config.json says {dtype_name}"
                    )
                if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                    raise ValueError(f"{path}: tensor {name} has NaN or infinite values")
                if not tensor.is_floating_point() and tensor.data_ptr() % 64:
                    # torch's int8/int4 CPU kernels assume 64-byte aligned weights (an
                    # unaligned int8 table segfaults _weight_int8pack_mm in bf16 for >= 4
                    # rows), and a tensor read from the file can start anywhere.
                    tensor = tensor.clone()
                state[name] = tensor
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    model.load_state_dict(state, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    # Module.to casts floating tensors only: quantized integer weights stay integers.
    return model.to(device=device, dtype=dtype).eval()
