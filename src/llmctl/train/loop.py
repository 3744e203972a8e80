"""The one training loop: every training command calls `train` with its own batches and loss.

`train(model, batches, objective, cfg, writer)` knows nothing about which command called it.
Per optimizer step it runs `grad_accum` micro-batches (forward under bf16 autocast on CUDA, fp32
on CPU), sums the objective's loss over them and over ranks, divides the gradients by the total
item count (so any split of the batch gives the same step), checks the loss and the pre-clip
gradient norm are finite *before* touching the weights (and warns on a loss spike), clips, and
steps AdamW at the scheduled LR. It logs to `metrics.jsonl`, evaluates every `eval_every` steps,
and saves its whole state (weights, optimizer, every generator, the batch cursor, counters)
every `save_every` steps into `writer.state_dir`, atomically. Calling it again with the same
writer resumes from that state and continues bit for bit; a different config is refused.

Example:
    writer = Writer(art.dir, fingerprint=to_dict(cfg))
    result = train(model, StepBatches(stream.sample), NextToken(), TrainConfig(steps=100), writer)
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from llmctl.errors import UsageError
from llmctl.runtime import info, progress, warn
from llmctl.train import distributed
from llmctl.train.objectives import Objective
from llmctl.train.optim import Schedule, build_optimizer, set_lr
from llmctl.train.state import (
    TENSORS,
    config_diff,
    read_meta,
    restore,
    rng_state,
    save_state,
    set_rng_state,
)

PRECISIONS = ("auto", "float32", "bfloat16")
# A step loss above SPIKE_FACTOR × the largest of the last SPIKE_WINDOW step losses is reported
# (not fatal): Megatron's SPIKY_LOSS_FACTOR. Often a bad batch or an LR too high for the data.
SPIKE_FACTOR = 10.0
SPIKE_WINDOW = 100

# Dense bf16 peak FLOP/s by device name (substring match, most specific first). The 2:4-sparse
# figures NVIDIA also quotes are twice these and are not what a dense matmul can reach.
PEAK_BF16_FLOPS = (
    ("H200 NVL", 836e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def peak_flops(device: torch.device) -> float | None:
    """The dense bf16 peak of a CUDA device, or None when unknown (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


@dataclass(frozen=True)
class TrainConfig:
    """How to optimize; the command decides what (model, batches, objective)."""

    steps: int
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still logged)
    seed: int = 0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = False
    activation_checkpointing: bool = False
    strategy: str = "ddp"  # under torchrun: ddp or fsdp
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 100  # 0 = only at the end
    log_every: int = 10
    flops_per_token: float = 0.0  # training FLOPs per token, for MFU (0 = not reported)

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum"):
            if getattr(self, name) < 1:
                raise UsageError(f"config key '{name}': must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "save_every", "clip"):
            if getattr(self, name) < 0:
                raise UsageError(f"config key '{name}': must be >= 0, got {getattr(self, name)}")
        if self.seed < 0:
            raise UsageError(f"config key 'seed': must be >= 0, got {self.seed}")
        if self.log_every < 1:
            raise UsageError(f"config key 'log_every': must be >= 1, got {self.log_every}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UsageError("config keys 'lr' > 0 and 0 <= 'min_lr_ratio' <= 1 are required")
        if self.precision not in PRECISIONS:
            raise UsageError(f"config key 'dtype': {self.precision!r} is not one of {PRECISIONS}")


@dataclass
class TrainResult:
    """What a run did. Losses are means per item (token); None when not measured."""

    steps: int
    start_step: int  # 0, or the step a resumed run continued from
    train_loss: float
    val_loss: float | None
    tokens_seen: int
    tokens_per_s: float | None  # over the steps this process ran, first one excluded
    mfu: float | None
    train_time_s: float


class NonFiniteLoss(UsageError):
    """The loss or gradient norm of a step was NaN or infinite; the weights were not updated."""


class Batches(Protocol):
    def __next__(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Writer:
    """Where a run writes: `metrics.jsonl` and `_state/` inside the artifact being built.

    `fingerprint` is everything that determines the run's numbers (the command's resolved
    config, the input's digest); a resume with a different fingerprint is refused. Only the
    main rank writes.
    """

    def __init__(self, dir: Path | str, fingerprint: dict[str, Any], *, main: bool = True):
        self.dir = Path(dir)
        self.fingerprint = fingerprint
        self.main = main
        self.metrics_path = self.dir / "metrics.jsonl"
        self.state_dir = self.dir / "_state"
        if main:
            self.dir.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def rewind(self, step: int) -> None:
        """Drop metrics of steps after `step` (written after the state being resumed)."""
        if not self.main or not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines(keepends=True)
        keep = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a torn last line from a kill
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, self.metrics_path)


class _Signals(AbstractContextManager["_Signals"]):
    """Turn SIGINT/SIGTERM into a flag checked between steps (so state is saved first)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA (precision auto or bfloat16) or when asked for on CPU; else none."""
    if precision == "bfloat16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def micro_seed(seed: int, index: int, stream: int = 0) -> int:
    """A well-mixed 63-bit generator seed for micro-batch `index` (stream 0: training,
    stream 1: evaluation), independent of device, process count and interruptions."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(2, np.uint32)
    return int(state.view(np.uint64)[0]) >> 1


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    objective: Objective,
    *,
    seed: int = 0,
    precision: str = "auto",
) -> tuple[float, int]:
    """(mean loss per item, items) of `objective` over `batches`, in eval mode. Randomness
    (MLM masks) comes from a generator seeded per batch, so every evaluation is the same."""
    inner = getattr(model, "_orig_mod", model)
    was_training = inner.training
    model.eval()
    device = next(inner.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    gen = torch.Generator()
    try:
        for i, batch in enumerate(batches):
            gen.manual_seed(micro_seed(seed, i, stream=1))
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(device, precision):
                out = objective(model, batch, gen)
            total += out.total.double()
            count += out.count
    finally:
        model.train(was_training)
    n = int(count.item())
    return (total.item() / n if n else math.nan), n


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None  # type: ignore[assignment]
    return cfg


def train(
    model: nn.Module,
    batches: Batches,
    objective: Objective,
    cfg: TrainConfig,
    writer: Writer,
    *,
    val: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None,
) -> TrainResult:
    """Train `model` (already on its device) for `cfg.steps` optimizer steps, resuming from
    `writer.state_dir` when a state is there. `val()` returns fresh validation batches."""
    device = next(model.parameters()).device
    world = distributed.current(device)
    objective.check(model)
    if cfg.activation_checkpointing:
        if not hasattr(model, "gradient_checkpointing"):
            raise UsageError("activation_checkpointing: this model does not support it")
        model.gradient_checkpointing = True
    model.train()
    net = distributed.wrap(model, world, cfg.strategy)
    optimizer = build_optimizer(
        model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps
    )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if cfg.compile:
        net = torch.compile(net)
    sched = Schedule(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    fingerprint = {**writer.fingerprint, "world_size": world.size}

    # Saved with the state: a resumed run logs the same figures as an uninterrupted one, also
    # when a save falls inside a logging window (window_loss/window_steps).
    counters: dict[str, Any] = {
        "tokens_seen": 0,
        "train_loss": math.nan,
        "val_loss": None,
        "train_time_s": 0.0,
        "window_loss": 0.0,
        "window_steps": 0,
    }
    found = read_meta(writer.state_dir)
    if found is not None:
        path, meta = found
        diff = config_diff(meta["fingerprint"], fingerprint)
        if diff:
            changes = "; ".join(
                f"{k}: {_get(meta['fingerprint'], k)!r} -> {_get(fingerprint, k)!r}" for k in diff
            )
            raise UsageError(
                f"{writer.dir}: holds an interrupted run with different settings ({changes}); "
                f"rerun with the same settings to resume, or delete {writer.dir} to start over"
            )
        restore(model, optimizer, path / TENSORS, meta)
        mine = meta["ranks"][world.rank]
        set_rng_state(mine["rng"])
        batches.load_state_dict(mine["batches"])
        start = meta["step"]
        counters.update(meta["counters"])
        if world.main:
            info(f"resuming from step {start:,} of {cfg.steps:,} ({path})")
    else:
        start = 0
        torch.manual_seed(cfg.seed + world.rank)  # dropout differs across ranks
    writer.rewind(start)
    saved_step = start if found is not None else None

    def save(step: int) -> None:
        nonlocal saved_step
        # A step whose loss and gradients were finite can still overflow the weights (a huge
        # lr): such weights must never replace the last good state.
        bad = sum(not bool(torch.isfinite(_local(p)).all()) for p in params)
        flag = torch.tensor([float(bad)], dtype=torch.float64, device=device)
        distributed.all_reduce_sum(flag)
        if flag.item():
            kept = f"step {saved_step:,}" if saved_step is not None else "none saved yet"
            raise NonFiniteLoss(
                f"step {step:,}: the optimizer step made {bad} parameter tensors non-finite; "
                f"they were not saved (last good state: {kept}, in {writer.state_dir})"
            )
        ranks = distributed.gather_json(
            {"rng": rng_state(), "batches": batches.state_dict()}, device
        )
        save_state(
            writer.state_dir,
            step=step,
            model=model,
            optimizer=optimizer,
            meta={"fingerprint": fingerprint, "ranks": ranks, "counters": counters},
            write=world.main,
        )
        distributed.barrier()
        saved_step = step

    peak = peak_flops(device)
    gen = torch.Generator()
    window_tokens, window_start = 0, time.perf_counter()
    timed_steps, run_tokens, run_time = 0, 0, 0.0
    tokens_per_s = mfu = None
    A, W = cfg.grad_accum, world.size
    recent: deque[float] = deque(maxlen=SPIKE_WINDOW)  # step losses, for the spike warning

    with _Signals() as signals, _progress(world.main, cfg.steps - start) as bar:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            lr = sched(step)
            set_lr(optimizer, lr)
            acc = torch.zeros(2, dtype=torch.float64, device=device)
            tokens = 0
            for a in range(A):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
                gen.manual_seed(micro_seed(cfg.seed, (step * W + world.rank) * A + a))
                with distributed.no_sync(net, last=a == A - 1):
                    with autocast(device, cfg.precision):
                        out = objective(net, batch, gen)
                    out.total.backward()
                acc[0] += out.total.detach()
                acc[1] += out.count
                tokens += out.tokens
            distributed.all_reduce_sum(acc)
            total, count = acc.tolist()
            loss = total / count if count else math.nan
            if not math.isfinite(loss):
                _stop(step, f"loss is {loss}", saved_step, writer)
            if world.main and recent and loss > SPIKE_FACTOR * max(recent) > 0:
                warn(
                    f"step {step + 1:,}: loss spike: {loss:.4g} is over {SPIKE_FACTOR:g}× the "
                    f"largest of the last {len(recent)} steps ({max(recent):.4g}); continuing"
                )
            recent.append(loss)
            # DDP/FSDP average gradients over ranks; make them d(sum of losses)/d(w) / count.
            grads = [p.grad for p in params if p.grad is not None]
            torch._foreach_mul_(grads, W / count)
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else math.inf)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            grad_norm = float(norm)
            if not math.isfinite(grad_norm):
                _stop(step, f"gradient norm is {grad_norm}", saved_step, writer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            done = step + 1
            step_tokens = tokens * W
            counters["tokens_seen"] += step_tokens
            now = time.perf_counter()
            counters["train_time_s"] += now - t0
            counters["window_loss"] += loss
            counters["window_steps"] += 1
            window_tokens += step_tokens
            timed_steps += 1
            if timed_steps > 1:  # the first step (compilation, warm-up) is not timed
                run_tokens += step_tokens
                run_time += now - t0

            if done % cfg.log_every == 0 or done == cfg.steps:
                elapsed = max(now - window_start, 1e-9)
                rate = window_tokens / elapsed
                counters["train_loss"] = counters["window_loss"] / counters["window_steps"]
                record = {
                    "step": done,
                    "loss": counters["train_loss"],
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": counters["tokens_seen"],
                    "tokens_per_s": round(rate, 1),
                }
                if peak and cfg.flops_per_token:
                    record["mfu"] = round(rate * cfg.flops_per_token / (peak * W), 4)
                writer.log(record)
                fields = {
                    "loss": f"{record['loss']:.4f}",
                    "lr": f"{lr:.2e}",
                    "tok/s": f"{rate:,.0f}",
                }
                if "mfu" in record:
                    fields["mfu"] = f"{record['mfu']:.1%}"
                bar.advance(counters["window_steps"], **fields)
                counters["window_loss"], counters["window_steps"] = 0.0, 0
                window_tokens, window_start = 0, time.perf_counter()

            if (
                val is not None
                and cfg.eval_every
                and done % cfg.eval_every == 0
                and done < cfg.steps
            ):
                _eval(net, val, objective, cfg, writer, counters, done)
                window_start = time.perf_counter()
            if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
                save(done)
                window_start = time.perf_counter()
            if _stop_requested(signals, world):
                save(done)
                _interrupted(signals.received or signal.SIGTERM, done, writer)

    if run_tokens:  # steps only: evaluations and saves are not counted
        tokens_per_s = run_tokens / max(run_time, 1e-9)
        if peak and cfg.flops_per_token:
            mfu = tokens_per_s * cfg.flops_per_token / (peak * W)
    if val is not None and (saved_step != cfg.steps or counters["val_loss"] is None):
        _eval(net, val, objective, cfg, writer, counters, cfg.steps)
    if saved_step != cfg.steps:
        save(cfg.steps)  # a crash while publishing resumes straight to the end
    return TrainResult(
        steps=cfg.steps,
        start_step=start,
        train_loss=counters["train_loss"],
        val_loss=counters["val_loss"],
        tokens_seen=counters["tokens_seen"],
        tokens_per_s=tokens_per_s,
        mfu=mfu,
        train_time_s=counters["train_time_s"],
    )


def _eval(
    net: nn.Module,
    val: Callable[[], Iterable[dict[str, torch.Tensor]]],
    objective: Objective,
    cfg: TrainConfig,
    writer: Writer,
    counters: dict[str, Any],
    step: int,
) -> None:
    loss, n = evaluate(net, val(), objective, seed=cfg.seed, precision=cfg.precision)
    counters["val_loss"] = loss
    writer.log({"step": step, "val_loss": loss, "val_items": n})
    if writer.main:
        info(f"step {step:,}: val loss {loss:.4f}")


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (FSDP2 parameters are DTensors)."""
    return p.to_local() if hasattr(p, "to_local") else p


def _stop(step: int, what: str, saved_step: int | None, writer: Writer) -> None:
    kept = (
        f"the last good state (step {saved_step:,}) is kept in {writer.state_dir}"
        if saved_step is not None
        else "no state had been saved yet"
    )
    raise NonFiniteLoss(
        f"step {step + 1:,}: {what}; stopped before the optimizer step, weights not updated; "
        f"{kept} (lower lr, raise warmup or check the data)"
    )


def _stop_requested(signals: _Signals, world: distributed.World) -> bool:
    """Whether any rank got SIGINT/SIGTERM (all ranks must stop at the same step)."""
    if world.size == 1:
        return signals.received is not None
    flag = torch.tensor([0 if signals.received is None else 1], device=world.device)
    return bool(distributed.all_reduce_sum(flag).item())


def _interrupted(signum: int, step: int, writer: Writer) -> None:
    name = signal.Signals(signum).name
    warn(f"{name} at step {step:,}: state saved in {writer.state_dir}; rerun to resume")
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


class _NullBar:
    def advance(self, n: float = 1, **fields: Any) -> None:
        pass


def _progress(main: bool, total: int) -> AbstractContextManager[Any]:
    return progress("train", total=total, unit="it") if main else nullcontext(_NullBar())


def as_dict(result: TrainResult) -> dict[str, Any]:
    """The result as JSON-able stats."""
    return asdict(result)
