"""The frozen reference of preference training, and a reward model's starting point.

`reference_context` gives the reference as a context manager (the model with its adapters off
under LoRA, else a frozen copy of the starting model), `reference_fn` its sequence log-probs
as a function of a batch, and `cached_reference_logps` those log-probs of every item, computed
once with the starting model and kept in a safetensors file of the in-progress output, so
later epochs and a resumed run never run the reference again. `score_model` turns a causal LM
into a `head = "score"` model for Bradley-Terry training.

Example:
    >>> logps, state, seconds = cached_reference_logps(model, items, path, key, batch_size=8,
    ...                                                precision="float32", device=dev, main=True)
    >>> logps.shape                          # [len(items), 2]: chosen, rejected (KTO: [N, 2] too)
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmctl.errors import UsageError
from llmctl.runtime import seed_everything, warn


def score_model(lm: nn.Module, seed: int) -> nn.Module:
    """A `head = "score"` copy of `lm`: every weight but the lm head, a new scalar head made
    right after seeding with `seed`."""
    seed_everything(seed)
    config = dataclasses.replace(lm.config, head="score")  # type: ignore[arg-type]
    rm = type(lm)(config)
    state = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = rm.load_state_dict(state, strict=False)
    assert set(missing) == {"score.weight"} and not unexpected, (missing, unexpected)
    return rm


def reference_context(model: nn.Module, lora: bool) -> Callable[[], AbstractContextManager[Any]]:
    """The reference as `with reference() as ref:`: `model` with its adapters disabled (LoRA
    trains adapters on a frozen base, so the base is the reference), else a frozen copy of
    `model` taken now, before any step."""
    if lora:
        from llmctl.model.lora import adapters_disabled

        @contextmanager
        def off() -> Any:
            with adapters_disabled(model):
                yield model

        return off
    from llmctl.train.preference import frozen

    return frozen(copy.deepcopy(model).eval().requires_grad_(False))


def reference_fn(reference: Callable[[], AbstractContextManager[Any]]) -> Callable[..., Any]:
    """(tokens, mask) -> the reference's summed log-probs of each row, without gradients."""
    from llmctl.train.preference import sequence_logps

    @torch.no_grad()
    def fn(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with reference() as ref:
            return sequence_logps(ref, tokens, mask)[0]

    return fn


def cached_reference_logps(
    model: nn.Module,
    items: list[Any],
    path: Path,
    key: str,
    *,
    batch_size: int,
    precision: str,
    device: torch.device,
    main: bool,
) -> tuple[torch.Tensor, str, float]:
    """The reference log-probs of every item, [N, 2] fp32, with how they were obtained and the
    seconds the reference pass took (0 when reused). Read from `path` when its `key` (the
    checkpoint's digest, the tokenized items, the precision) matches; else computed with
    `model` and written there by the main rank (a damaged or foreign cache is recomputed,
    never trusted)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from llmctl.data.preferences import PairRows
    from llmctl.model.io import check_safetensors
    from llmctl.train.preference import reference_logps

    if path.is_file():
        try:
            check_safetensors(path)
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                t = f.get_tensor("logps")
        except Exception as e:
            warn(f"{path}: unreadable reference cache ({type(e).__name__}); recomputing")
        else:
            if (meta.get("key") == key and t.dtype == torch.float32
                    and tuple(t.shape) == (len(items), 2) and torch.isfinite(t).all()):  # fmt: skip
                return t, "cached (reused)", 0.0
            warn(f"{path}: reference cache does not match this run; recomputing")
    began = time.perf_counter()
    rows = PairRows(items, list(range(len(items))), batch_size=batch_size, seed=0, pad_id=0,
                    shuffle=False)  # fmt: skip
    t = reference_logps(model, rows.sequential(), len(items), device=device, precision=precision)
    if not torch.isfinite(t).all():
        raise UsageError("reference log-probs are not finite (the checkpoint is broken?)")
    if main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"logps": t.contiguous()}, tmp, metadata={"key": key, "items": str(len(items))})
        tmp.replace(path)
    return t, "cached (computed once)", time.perf_counter() - began
