"""Micro-batch streams for the training loop, with a cursor that makes resumption exact.

The loop pulls `next(stream)` once per micro-batch and saves `stream.state_dict()` with its
state. `StepBatches` deals micro-batches from a random-access source (`source(i)` returns the
i-th micro-batch of the whole run, e.g. `TokenStream.sample`), so that an optimizer step always
consumes micro-batches `[step * world * accum, (step + 1) * world * accum)`, rank r taking
its `accum` consecutive ones. One process with accumulation 2 therefore sees exactly what two
processes with accumulation 1 see together, and the cursor is one integer.

Example:
    stream = StepBatches(tokens.sample, accum=4, rank=0, world=1)
    batch = next(stream)          # {"tokens": int64 tensor [B, T+1]}
    state = stream.state_dict()   # {"consumed": 1}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch


class StepBatches(Iterator[dict[str, torch.Tensor]]):
    """This rank's micro-batches, in order, from `source(global_index) -> int array [B, L]`."""

    def __init__(
        self,
        source: Callable[[int], np.ndarray],
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
        arr = self.source(self.index(self.consumed))
        self.consumed += 1
        return {self.key: torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))}

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "accum": self.accum, "world": self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["accum"], state["world"]) != (self.accum, self.world):
            raise ValueError("StepBatches: saved cursor is for a different accum/world size")
        self.consumed = int(state["consumed"])
