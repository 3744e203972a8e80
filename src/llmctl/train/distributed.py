"""torch.distributed for training commands: process group, model wrapping, small collectives.

Under `torchrun` (RANK/WORLD_SIZE/LOCAL_RANK set) `init()` starts the process group: NCCL on
CUDA, one GPU per local rank; gloo on CPU (which is how the tests run two processes). Without
torchrun everything here is a no-op for a world of one. Rank 0 writes artifacts and metrics.

Example:
    world = init("auto")                    # World(rank=0, size=1, device=cuda:0) ...
    model = wrap(model, world, "ddp")       # DDP, or FSDP2 `fully_shard` with "fsdp"
    total = all_reduce_sum(torch.tensor([loss_sum, count]))
"""

from __future__ import annotations

import json
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from llmctl.errors import UsageError

STRATEGIES = ("ddp", "fsdp")
# How long a collective waits for the other ranks before it fails (NCCL and gloo alike): a
# rank that died or hangs ends the run with an error instead of a silent wait. PyTorch's own
# default is 10 minutes for NCCL and 30 for gloo; LLMCTL_DIST_TIMEOUT_S sets it (seconds).
TIMEOUT_ENV = "LLMCTL_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0


def timeout_s() -> float:
    """The collective timeout in seconds: LLMCTL_DIST_TIMEOUT_S, else 600."""
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UsageError(f"environment variable {TIMEOUT_ENV}: seconds > 0, got {raw!r}")
    return value


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints progress."""
        return self.rank == 0


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """`auto` → CUDA when available, else CPU; `cuda` without CUDA is a UsageError."""
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"config key 'device': {device!r} is not one of 'auto', 'cpu', 'cuda'")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("config key 'device': cuda requested but no CUDA device is available")
    if device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def init(device: str = "auto") -> World:
    """Start the process group when launched by torchrun; return this process's World."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        from datetime import timedelta

        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            device_id=dev if dev.type == "cuda" else None,
            timeout=timedelta(seconds=timeout_s()),
        )
    return World(rank=rank, size=size, local_rank=local_rank, device=dev)


def current(device: torch.device) -> World:
    """The World of an already-initialized process (a world of one when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return World(dist.get_rank(), dist.get_world_size(), local, device)
    return World(0, 1, 0, device)


def shutdown() -> None:
    """Tear the process group down (call once, at the end of a distributed command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, strategy: str = "ddp") -> nn.Module:
    """The module to run forward/backward on: `model` itself in a world of one, else DDP or
    FSDP2 (`fully_shard` per block, then the root; parameters become sharded DTensors)."""
    if strategy not in STRATEGIES:
        raise UsageError(f"config key 'distributed.strategy': {strategy!r} is not ddp or fsdp")
    if world.size == 1:
        return model
    if strategy == "ddp":
        ids = [world.device.index] if world.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "blocks", []):
        fully_shard(block)
    # Trainable extras (model.aux) run outside the model's forward: as units of their own,
    # their parameters are gathered when the objective calls them.
    for extra in getattr(model, "aux", {}).values():
        if any(p.requires_grad for p in extra.parameters()):
            fully_shard(extra)
    fully_shard(model)
    return model


def no_sync(module: nn.Module, last: bool) -> AbstractContextManager[Any]:
    """Skip the gradient all-reduce on every micro-batch but the last of an optimizer step."""
    if isinstance(module, nn.parallel.DistributedDataParallel):
        return nullcontext() if last else module.no_sync()
    inner = getattr(module, "_orig_mod", module)  # torch.compile wrapper
    if isinstance(inner, nn.parallel.DistributedDataParallel):
        return nullcontext() if last else inner.no_sync()
    if hasattr(inner, "set_requires_gradient_sync"):  # FSDP2
        inner.set_requires_gradient_sync(last)
    return nullcontext()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all ranks, in place (no-op in a world of one)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def gather_json(obj: Any, device: torch.device) -> list[Any]:
    """Every rank's JSON-able `obj`, in rank order, on every rank. Sent as UTF-8 bytes in
    tensors (no pickle, unlike `all_gather_object`)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [
        json.loads(bytes(p[: int(s.item())].cpu().tolist()).decode())
        for p, s in zip(parts, sizes, strict=True)
    ]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
