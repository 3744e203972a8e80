"""In-progress training state: saved atomically as safetensors + JSON, restored bit for bit.

A save writes `state.safetensors` (model and optimizer tensors) and `state.json` (step, the run's
config fingerprint, every generator's state per rank, the batch stream's cursor, counters) into a
hidden temporary directory, fsyncs them, and renames it to `step-NNNNNNNN/` in one `os.replace`;
only then are older states deleted. A directory named `step-*` is therefore always complete, and a
kill at any moment leaves the previous state loadable. Nothing is pickled.

Example:
    save_state(state_dir, step=100, model=model, optimizer=opt, meta={"config": cfg})
    meta = load_state(state_dir, model, opt)   # None when there is nothing to resume
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from llmctl.artifacts import sha256_file
from llmctl.errors import UsageError

FORMAT = 1
TENSORS = "state.safetensors"
META = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _options(gather: bool, strict: bool = True) -> Any:
    # torch.distributed.checkpoint costs a second to import: only training pays for it.
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Full (unsharded) tensors; when saving under a process group, gathered to rank 0's CPU.
    return StateDictOptions(
        full_state_dict=True, cpu_offload=gather and _distributed(), strict=strict
    )


def frozen_names(model: nn.Module) -> set[str]:
    """State-dict names of parameters that do not train (a LoRA base, a frozen teacher): the
    training state leaves them out; whoever built the model names their source in the run's
    fingerprint."""
    return {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def collect(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Model (without frozen parameters) and optimizer state dicts, full, not sharded (every
    rank must call this: FSDP gathers shards; under a process group only rank 0 gets them)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    frozen = frozen_names(model)
    msd = get_model_state_dict(model, options=_options(True))
    return (
        {k: v for k, v in msd.items() if k not in frozen},
        get_optimizer_state_dict(model, optimizer, options=_options(True)),
    )


def flatten(msd: dict, osd: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json) for safetensors: keys `model/<name>` and `optim/<name>/<slot>`; a tied
    parameter is stored once and named in `aliases`."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int], str] = {}
    for name, t in msd.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[f"model/{name}"] = t.detach().cpu().contiguous()
    for name, slots in osd["state"].items():
        for slot, value in slots.items():
            tensors[f"optim/{name}/{slot}"] = torch.as_tensor(value).detach().cpu().contiguous()
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
        for g in osd["param_groups"]
    ]
    return tensors, {"aliases": aliases, "param_groups": groups}


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, info: dict) -> None:
    """Load the tensors written by `save_state` back into `model` and `optimizer` (every rank
    reads the file itself)."""
    msd: dict[str, torch.Tensor] = {}
    osd: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            kind, rest = key.split("/", 1)
            if kind == "model":
                msd[rest] = f.get_tensor(key)
            else:
                name, slot = rest.rsplit("/", 1)
                osd.setdefault(name, {})[slot] = f.get_tensor(key)
    for alias, name in info["aliases"].items():
        msd[alias] = msd[name]
    groups = []
    for g in info["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # Frozen parameters were not saved: they keep the values the caller loaded.
    missing = sorted(set(model.state_dict()) - set(msd) - frozen_names(model))
    if missing:
        raise UsageError(f"{path}: training state lacks {', '.join(missing[:3])} (not this model)")
    set_model_state_dict(model, msd, options=_options(False, strict=False))
    state = {"state": osd, "param_groups": groups}
    set_optimizer_state_dict(model, optimizer, state, options=_options(False))


def rng_state() -> dict[str, Any]:
    """Every global generator's state as JSON: torch CPU, each CUDA device, numpy, Python."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "cuda": [
            base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()
        ]
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else [],
        "numpy": [np_state[0], np_state[1].tolist(), *(float(x) for x in np_state[2:])],
        "python": [py_version, list(py_internal), py_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""

    def tensor(b64: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if state["cuda"]:
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def latest(state_dir: Path) -> Path | None:
    """The newest complete state directory, or None."""
    if not state_dir.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in state_dir.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / META).is_file()
    ]
    return max(found)[1] if found else None


def save_state(
    state_dir: Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    write: bool = True,
) -> Path | None:
    """Save the state after `step` optimizer steps. Every rank must call it (FSDP gathers
    shards); only the rank with `write=True` touches the disk. Returns the directory written."""
    msd, osd = collect(model, optimizer)
    if not write:
        return None
    tensors, info = flatten(msd, osd)
    state_dir.mkdir(parents=True, exist_ok=True)
    final = state_dir / f"step-{step:08d}"
    tmp = state_dir / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, tmp / TENSORS, metadata={"format": "pt"})
    _fsync_file(tmp / TENSORS)
    body = {
        "format": FORMAT,
        "step": step,
        "tensors_sha256": sha256_file(tmp / TENSORS),
        **info,
        **meta,
    }
    with open(tmp / META, "w", encoding="utf-8") as f:
        json.dump(body, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(state_dir)
    # Only now that the new state is in place: drop older states and leftovers of killed saves.
    for p in state_dir.iterdir():
        if p != final and (p.name.startswith(".tmp-") or _STEP_DIR.match(p.name)):
            trash = state_dir / f".trash-{p.name}"
            os.replace(p, trash)
            shutil.rmtree(trash, ignore_errors=True)
        elif p.name.startswith(".trash-"):
            shutil.rmtree(p, ignore_errors=True)
    return final


def read_meta(state_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """(directory, parsed state.json) of the newest complete state, or None. The tensors file
    is checked against the sha256 recorded beside it."""
    path = latest(state_dir)
    if path is None:
        return None
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path / META}: unreadable training state ({e}); delete {path}") from e
    if meta.get("format") != FORMAT:
        raise UsageError(f"{path / META}: unknown state format {meta.get('format')!r}")
    if sha256_file(path / TENSORS) != meta["tensors_sha256"]:
        raise UsageError(f"{path / TENSORS}: sha256 differs from {META} (corrupted); delete {path}")
    return path, meta


def config_diff(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON-like configs (['lr', 'model.n_layer'])."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(now), key=str):
            out += config_diff(saved.get(key), now.get(key), f"{prefix}{key}.")
        return out
    # JSON turns tuples into lists; compare in that form
    norm = json.loads(json.dumps(saved)), json.loads(json.dumps(now))
    return [] if norm[0] == norm[1] else [prefix.rstrip(".")]
