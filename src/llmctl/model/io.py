"""Checkpoints on disk: `model.safetensors` + `config.json` (+ tokenizer files from callers).

The layout follows Hugging Face conventions (tied lm head stored once, as `tok_emb.weight`;
`config.json` with `model_type` and `architectures`). Nothing is unpickled: tensors come
through safetensors, metadata through JSON, and every tensor is checked for name, shape,
dtype and finiteness before the model is built.

Example:
    >>> save_checkpoint(tmp / "ckpt", model, {"tokenizer.json": tok_path})
    >>> model = load_model(tmp / "ckpt", device="cuda", dtype=torch.bfloat16)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llmctl.model.gpt import GPT, GPTConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MODEL_TYPE = "llmctl-gpt"
ARCHITECTURES = ["LlmctlGPT"]
_META_KEYS = ("model_type", "architectures", "dtype")

# config.json blocks that change the model's modules (e.g. "quantization"): key -> a function
# that swaps modules on the freshly built meta model before the weights are loaded. The
# quantized model keeps the block as an attribute of the same name, which save_checkpoint
# writes back.
_SWAPS: dict[str, Callable[[GPT, dict[str, Any]], None]] = {}


def register_swap(key: str, fn: Callable[[GPT, dict[str, Any]], None]) -> None:
    """Let config.json's `key` block rebuild modules of the meta model before loading."""
    _SWAPS[key] = fn


def _register_builtin_swaps() -> None:
    if "quantization" not in _SWAPS:
        from llmctl.model.quant import apply_quantization

        register_swap("quantization", apply_quantization)


def _fixed_dtype_names(model: GPT) -> set[str]:
    """Tensors whose dtype is part of the format (int8 weights, float16 int4 scales), not the
    checkpoint's float dtype: modules list them in `fixed_dtypes`."""
    names = set()
    for prefix, module in model.named_modules():
        for t in getattr(module, "fixed_dtypes", ()):
            names.add(f"{prefix}.{t}" if prefix else t)
    return names


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _saved_state(model: GPT) -> dict[str, torch.Tensor]:
    # A tied lm head shares storage with the token embedding; safetensors refuses shared
    # storage, and HF stores the tie once too, so it is dropped here and re-tied on load.
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # a quantized tied head owns no tensors
    return state


def save_checkpoint(
    dir: str | Path, model: GPT, extra_files: dict[str, Path | bytes] | None = None
) -> Path:
    """Write `model.safetensors` and `config.json` into `dir` (created if needed), plus each
    `extra_files` entry: name -> a file to copy or the bytes to write. Returns `dir`.
    Refuses (ValueError) a model with non-finite weights, before writing anything.
    The caller makes the directory's publication atomic (see artifacts.py)."""
    out = Path(dir)
    _register_builtin_swaps()
    state = {k: v.detach().contiguous().cpu() for k, v in _saved_state(model).items()}
    fixed = _fixed_dtype_names(model)
    dtypes = {t.dtype for k, t in state.items() if k not in fixed}
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
        "model_type": MODEL_TYPE,
        "architectures": ARCHITECTURES,
        "dtype": _dtype_name(dtypes.pop()),
    }
    for key in _SWAPS:
        block = getattr(model, key, None)
        if block is not None:
            config[key] = block
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
    if not isinstance(data, dict) or data.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{path}: model_type is not {MODEL_TYPE!r}")
    return data


def load_config(dir: str | Path) -> GPTConfig:
    """The GPTConfig stored in `dir/config.json`; ValueError naming the file if it is bad."""
    path = Path(dir) / CONFIG_FILE
    data = _read_config(Path(dir))
    _register_builtin_swaps()
    skip = (*_META_KEYS, *_SWAPS)
    try:
        return GPTConfig.from_dict({k: v for k, v in data.items() if k not in skip})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def load_model(
    dir: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> GPT:
    """Build the GPT saved in `dir` on `device` (cast to `dtype` if given), in eval mode.
    Raises ValueError naming the file and tensor for a missing, unexpected, misshapen,
    wrongly typed or non-finite tensor."""
    dir = Path(dir)
    config = load_config(dir)
    data = _read_config(dir)
    saved_dtype = data.get("dtype")
    path = dir / WEIGHTS_FILE
    with torch.device("meta"):
        model = GPT(config)
        for key, swap in _SWAPS.items():
            if key in data:
                try:
                    swap(model, data[key])
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{dir / CONFIG_FILE}: {e}") from None
    fixed = _fixed_dtype_names(model)
    expected = {
        k: (tuple(v.shape), _dtype_name(v.dtype) if k in fixed else saved_dtype)
        for k, v in _saved_state(model).items()
    }
    state: dict[str, torch.Tensor] = {}
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
                if not torch.isfinite(tensor).all():
                    raise ValueError(f"{path}: tensor {name} has NaN or infinite values")
                if name in fixed and tensor.data_ptr() % 64:
                    # torch's int8/int4 CPU kernels assume 64-byte aligned weights (an
                    # unaligned int8 table segfaults _weight_int8pack_mm in bf16 for >= 4
                    # rows); tensors read from the file can start anywhere.
                    tensor = tensor.clone()
                state[name] = tensor
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings and isinstance(model.lm_head, torch.nn.Linear):
        model.lm_head.weight = model.tok_emb.weight
    return model.to(device=device, dtype=dtype).eval()
