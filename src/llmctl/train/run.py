"""Train under torchrun (or alone), gather the result, publish the artifact from rank 0: once.

Every training command (pretrain, finetune, lora, align, distill, quantize --method qat) ends
the same way: all ranks train with the one loop, the trained weights are gathered (FSDP shards
become one CPU model on rank 0), and rank 0 alone builds and publishes the artifact while the
other ranks only read the state rank 0 writes. The command supplies what differs: how to
save the trained model into the artifact directory, and its own stats.

Example:
    world = distributed.init(cfg.device)
    stats = train_and_publish(
        out, world=world, model=model, batches=batches, objective=NextToken(), cfg=cfg,
        fingerprint={"config": settings, "tokens": tokens.digest}, command="pretrain",
        config=to_dict(cfg), inputs={"tokens": tokens.path},
        save=lambda dir, m: save_checkpoint(dir, m, tokenizer_files), force=force,
    )
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmctl.artifacts import building, partial_dir
from llmctl.errors import DistributedFailure
from llmctl.train import distributed
from llmctl.train.loop import Batches, Probe, TrainResult, Writer, as_dict, train
from llmctl.train.objectives import Objective
from llmctl.train.settings import TrainSettings


def gather_model(
    model: nn.Module, world: distributed.World, rebuild: Callable[[], nn.Module] | None = None
) -> nn.Module | None:
    """The trained model as one plain module on rank 0 (None elsewhere); every rank calls it.
    In a world of one it is `model` itself. Otherwise the full state dict is gathered to rank
    0's CPU and loaded into `rebuild()` (default: the same class built from `model.config`),
    made on the meta device — so swapped modules (LoRA, quantized) need their own rebuild."""
    if world.size == 1:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not world.main:
        return None
    with torch.device("meta"):
        copy = rebuild() if rebuild is not None else type(model)(model.config)
    copy.load_state_dict(full, assign=True)
    if hasattr(copy, "tie_weights"):
        copy.tie_weights()  # assign=True loads tied names as two tensors: share them again
    return copy


def train_and_publish(
    out: Path,
    *,
    world: distributed.World,
    model: nn.Module,
    batches: Batches,
    objective: Objective,
    cfg: TrainSettings,
    fingerprint: dict[str, Any],
    command: str,
    config: dict[str, Any],
    inputs: dict[str, Path],
    save: Callable[[Path, nn.Module], None],
    stats: Callable[[TrainResult], dict[str, Any]] | None = None,
    kind: str = "checkpoint",
    val: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None,
    probes: Sequence[Probe] = (),
    flops_per_token: float = 0.0,
    rebuild: Callable[[], nn.Module] | None = None,
    eval_first: bool = False,
    force: bool = False,
) -> dict[str, Any]:
    """Train on every rank, then publish `out` (a `kind` artifact) from rank 0: `save(dir,
    model)` writes the trained model's files, the manifest's stats are the loop's result plus
    `stats(result)`. In-progress state lives in `.OUT.partial/_state`, so rerunning the same
    command resumes. Returns the stats (empty on ranks > 0). Shuts the process group down.
    A failed or timed-out collective (another rank died or hangs) becomes a one-line
    `DistributedFailure`; the state saved so far stays for the rerun."""
    failed = False
    try:
        if not world.main:  # ranks > 0 only read the state rank 0 writes
            distributed.barrier()
            writer = Writer(partial_dir(out), fingerprint, main=False)
            train(model, batches, objective, cfg, writer, val=val, probes=probes,
                  flops_per_token=flops_per_token, eval_first=eval_first)  # fmt: skip
            gather_model(model, world, rebuild)
            return {}
        with building(out, kind=kind, command=command, config=config, inputs=inputs,
                      force=force, resume=True) as art:  # fmt: skip
            distributed.barrier()
            writer = Writer(art.dir, fingerprint)
            result = train(model, batches, objective, cfg, writer, val=val, probes=probes,
                           flops_per_token=flops_per_token, eval_first=eval_first)  # fmt: skip
            final = gather_model(model, world, rebuild)
            assert final is not None
            save(art.dir, final)
            art.stats.update(
                {**as_dict(result), "world_size": world.size, "device": device_name(world)}
            )
            if stats is not None:
                art.stats.update(stats(result))
        return art.stats
    except RuntimeError as e:
        if world.size == 1 or not collective_failed(e):
            raise
        failed = True
        raise DistributedFailure(
            f"rank {world.rank} of {world.size}: a collective failed ({reason(e)}); another "
            f"training process died or stopped answering (timeout {distributed.timeout_s():g} "
            f"s, {distributed.TIMEOUT_ENV}); the state saved so far is kept: rerun the same "
            "command to resume"
        ) from None
    finally:
        if not failed:  # tearing down a group whose peer is gone can block: let exit do it
            distributed.shutdown()


def collective_failed(e: BaseException) -> bool:
    """Whether `e` is a failed or timed-out collective: NCCL raises DistError, gloo a plain
    RuntimeError whose message comes from gloo's transport (`.../gloo/transport/...`)."""
    return isinstance(e, torch.distributed.DistError) or (
        isinstance(e, RuntimeError) and "/gloo/" in str(e)
    )


def reason(e: BaseException) -> str:
    """A collective error's first sentence, without gloo's source location, at most 200
    characters: "Timed out waiting 600000ms for recv operation to complete"."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # "[/.../pair.cc:537] "
    return text.split(". This is typically")[0][:200]


def device_name(world: distributed.World) -> str:
    """'cpu' or the CUDA device's name, for the manifest."""
    if world.device.type == "cuda":
        return torch.cuda.get_device_name(world.device)
    return "cpu"
