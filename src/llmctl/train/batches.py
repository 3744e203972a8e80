"""Micro-batch streams for the training loop, with a cursor that makes resumption exact.

The loop pulls `next(stream)` once per micro-batch and saves `stream.state_dict()` with its
state. `StepBatches` deals micro-batches from a random-access source (`source(i)` returns the
i-th micro-batch of the whole run: one int array, e.g. `TokenStream.sample`, served under
`tokens`, or a dict of named arrays such as tokens + loss mask + positions for packed SFT,
or chosen/rejected + cached reference log-probs for DPO). `source(i)` must depend only on i
(compute any shuffling or packing plan up front, from the seed), so that an optimizer step always
consumes micro-batches `[step * world * accum, (step + 1) * world * accum)`, rank r taking
its `accum` consecutive ones. One process with accumulation 2 therefore sees exactly what two
processes with accumulation 1 see together, and the cursor is one integer.

Example:
    stream = StepBatches(tokens.sample, accum=4, rank=0, world=1)
    batch = next(stream)          # {"tokens": int64 tensor [B, T+1]}
    state = stream.state_dict()   # {"consumed": 1}
    sft = StepBatches(lambda i: {"tokens": ids[i], "loss_mask": mask[i]})
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from llmctl.data.tokens import TokenStream

Source = Callable[[int], "np.ndarray | dict[str, np.ndarray]"]


def as_tensors(
    item: np.ndarray | dict[str, np.ndarray], key: str = "tokens"
) -> dict[str, torch.Tensor]:
    """A source item as tensors: integer arrays become int64, floats float32, bools stay bool."""
    arrays = item if isinstance(item, dict) else {key: item}
    out = {}
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        if arr.dtype.kind in "iu":
            arr = arr.astype(np.int64, copy=False)
        elif arr.dtype.kind == "f":
            arr = arr.astype(np.float32, copy=False)
        out[name] = torch.from_numpy(np.ascontiguousarray(arr))
    return out


class StepBatches(Iterator[dict[str, torch.Tensor]]):
    """This rank's micro-batches, in order, from `source(global_index)`: an int array [B, L]
    (served as `key`) or a dict of named arrays."""

    def __init__(
        self,
        source: Source,
        *,
        accum: int = 1,
        rank: int = 0,
        world: int = 1,
        key: str = "tokens",
    ) -> None:
        if accum < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(f"StepBatches: bad accum/rank/world {accum}/{rank}/{world}")
        self.source, self.accum, self.rank, self.world, self.key = source, accum, rank, world, key
        self.consumed = 0

    def index(self, consumed: int) -> int:
        """Global index of this rank's `consumed`-th micro-batch."""
        step, a = divmod(consumed, self.accum)
        return (step * self.world + self.rank) * self.accum + a

    def __next__(self) -> dict[str, torch.Tensor]:
        item = self.source(self.index(self.consumed))
        self.consumed += 1
        return as_tensors(item, self.key)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "accum": self.accum, "world": self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["accum"], state["world"]) != (self.accum, self.world):
            raise ValueError("StepBatches: saved cursor is for a different accum/world size")
        self.consumed = int(state["consumed"])


def token_streams(
    path: Path,
    *,
    batch_size: int,
    span: int,
    seed: int,
    eval_batches: int,
    eos_id: int,
    vocab_size: int | None = None,
    reader: str = "the model's tokenizer",
) -> tuple[TokenStream, Callable[[], Iterator[dict[str, torch.Tensor]]] | None]:
    """A tokens artifact as training data: its train `TokenStream` (windows of span + 1
    tokens) and a `val()` that returns fresh validation batches (None, with a warning, when
    the artifact has no val split). The shards must end documents with `eos_id` and fit in
    `vocab_size`; otherwise one line says they do not match `reader`.

    Example:
        train, val = token_streams(tokens.path, batch_size=8, span=256, seed=0, eval_batches=20,
                                   eos_id=specials.eos, vocab_size=model.config.vocab_size)
        batches = StepBatches(train.sample, accum=cfg.grad_accum)
    """
    from llmctl.data.tokens import TokenStream
    from llmctl.errors import UsageError
    from llmctl.runtime import warn

    def stream(split: str) -> TokenStream:
        return TokenStream(path, split, batch_size, span, seed, verify=False)

    train = stream("train")
    if (vocab_size is not None and train.vocab_size > vocab_size) or train.eos_id != eos_id:
        raise UsageError(f"{path}: shards do not match {reader}")
    try:
        held_out = stream("val")
    except UsageError as e:
        warn(f"no validation: {e}")
        return train, None

    def val() -> Iterator[dict[str, torch.Tensor]]:
        return ({"tokens": torch.from_numpy(x)} for x in held_out.sequential(eval_batches))

    return train, val
