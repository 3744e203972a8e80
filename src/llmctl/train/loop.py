"""The one training loop: every training command calls `train` with its own batches and loss.

`train(model, batches, objective, cfg, writer)` knows nothing about which command called it.
Per optimizer step it runs `grad_accum` micro-batches (forward under bf16 autocast on CUDA, fp32
on CPU), sums the objective's loss over them and over ranks, divides the gradients by the total
item count (so any split of the batch gives the same step), checks the loss and the pre-clip
gradient norm are finite *before* touching the weights (and warns on a loss spike), clips, and
steps AdamW at the scheduled LR.

What an objective reports besides its loss (`LossOutput.metrics`, each a (sum, count) pair:
preference accuracy, reward margins, KL) is added up on the device over the micro-batches of a
log window and reduced across ranks once, when the window is logged: no host sync per
micro-batch. Every `eval_every` steps (and at the end) it evaluates `val()` with the same
objective and runs each probe (an evaluation that is not a loss: a reward score of samples, a
preference accuracy); both go to `metrics.jsonl`, the progress line and the result.

It saves its whole state (trainable weights, optimizer, every generator, the batch cursor,
counters) every `save_every` steps into `writer.state_dir`, atomically. Frozen parameters
(`requires_grad=False`: a LoRA base, a reference) are not saved: the caller's fingerprint names
what they were loaded from. Calling `train` again with the same writer resumes from that state
and continues bit for bit; a different fingerprint is refused.

Example:
    writer = Writer(art.dir, fingerprint=to_dict(cfg))
    result = train(model, StepBatches(stream.sample), NextToken(), TrainSettings(steps=100), writer)
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
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
from llmctl.train.settings import TrainSettings
from llmctl.train.state import (
    TENSORS,
    config_diff,
    read_meta,
    restore,
    rng_state,
    save_state,
    set_rng_state,
)

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


@dataclass
class TrainResult:
    """What a run did. Losses are means per item (token, pair); None when not measured.
    `metrics` holds the objective's own figures over the last log window, `val_metrics` those
    of the last evaluation and probes."""

    steps: int
    start_step: int  # 0, or the step a resumed run continued from
    train_loss: float
    val_loss: float | None
    tokens_seen: int
    tokens_per_s: float | None  # over the steps this process ran, first one excluded
    mfu: float | None
    train_time_s: float
    metrics: dict[str, float] = field(default_factory=dict)
    val_metrics: dict[str, float] = field(default_factory=dict)


class NonFiniteLoss(UsageError):
    """The loss or gradient norm of a step was NaN or infinite; the weights were not updated."""


class Batches(Protocol):
    def __next__(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# An evaluation that is not a loss: called with the (unwrapped) model, in eval mode and without
# gradients, and the step, on every rank at each evaluation; returns figures to log (rank 0's
# are written).
Probe = Callable[[nn.Module, int], dict[str, float]]


class Writer:
    """Where a run writes: `metrics.jsonl` and `_state/` inside the artifact being built.

    `fingerprint` is everything that determines the run's numbers (the command's resolved
    config, the input's digest, a frozen base's digest); a resume with a different fingerprint
    is refused. Only the main rank writes.
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


def first_evaluation(metrics: Path) -> dict[str, Any]:
    """The evaluation the loop logged at step 0 in `metrics` (metrics.jsonl; `eval_first`:
    the base model, before any training), or {} when there is none."""
    if not metrics.is_file():
        return {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec.get("step") == 0 and "val_loss" in rec:
            return rec
    return {}


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


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile and DDP wrappers (FSDP2 shards in place: itself)."""
    inner = getattr(model, "_orig_mod", model)
    return getattr(inner, "module", inner)


class MetricSums:
    """Named (sum, count) pairs added up on the device; read (and reduced) only when asked."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict[str, tuple[torch.Tensor | float, torch.Tensor | float]]) -> None:
        for name, (total, count) in metrics.items():
            acc = self.sums.get(name)
            if acc is None:
                acc = self.sums[name] = torch.zeros(2, dtype=torch.float64, device=self.device)
            acc[0] += torch.as_tensor(total, device=self.device).detach().double().sum()
            acc[1] += torch.as_tensor(count, device=self.device).double().sum()

    def means(self, reduce: bool = True) -> dict[str, float]:
        """{name: sum / count} (NaN where the count is 0), summed over ranks when `reduce`
        (every rank must call it with the same names: one all-reduce for all of them)."""
        if not self.sums:
            return {}
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n] for n in names])
        if reduce:
            distributed.all_reduce_sum(stacked)
        pairs = stacked.tolist()
        return {n: (s / c if c else math.nan) for n, (s, c) in zip(names, pairs, strict=True)}

    def state(self) -> dict[str, list[float]]:
        return {n: t.tolist() for n, t in self.sums.items()}

    def load(self, state: dict[str, list[float]]) -> None:
        self.sums = {
            n: torch.tensor(v, dtype=torch.float64, device=self.device) for n, v in state.items()
        }


@dataclass
class EvalResult:
    """Mean loss per item over `items`, and the objective's metrics as means."""

    loss: float
    items: int
    metrics: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    objective: Objective,
    *,
    seed: int = 0,
    precision: str = "auto",
) -> EvalResult:
    """The objective's mean loss (and metrics) over `batches`, in eval mode. Randomness (MLM
    masks) comes from a generator seeded per batch, so every evaluation is the same."""
    inner = unwrap(model)
    was_training = inner.training
    model.eval()
    device = next(inner.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    metrics = MetricSums(device)
    gen = torch.Generator()
    try:
        for i, batch in enumerate(batches):
            gen.manual_seed(micro_seed(seed, i, stream=1))
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with autocast(device, precision):
                out = objective(model, batch, gen)
            total += out.total.double()
            count += out.count
            metrics.add(out.metrics)
    finally:
        model.train(was_training)
    n = int(count.item())
    return EvalResult(total.item() / n if n else math.nan, n, metrics.means(reduce=False))


def _get(cfg: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None  # type: ignore[assignment]
    return cfg


def train(
    model: nn.Module,
    batches: Batches,
    objective: Objective,
    cfg: TrainSettings,
    writer: Writer,
    *,
    val: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None,
    probes: Sequence[Probe] = (),
    flops_per_token: float = 0.0,
    eval_first: bool = False,
) -> TrainResult:
    """Train `model` (already on its device) for `cfg.steps` optimizer steps, resuming from
    `writer.state_dir` when a state is there. `val()` returns fresh validation batches;
    `probes` run beside it; `flops_per_token` (training FLOPs) turns throughput into MFU.
    `eval_first` also evaluates before the first step (logged as step 0: a finetuned base's
    own loss), so even a short run shows where it started."""
    run = _Run(model, objective, cfg, writer)
    run.restore(batches)
    with run.running():
        if eval_first and run.start == 0 and (val is not None or probes):
            writer.rewind(-1)  # a run killed before its first save logged step 0 already
            run.evaluate(0, val, probes)
        for step in range(run.start, cfg.steps):
            lr = run.sched(step)
            set_lr(run.optimizer, lr)
            total, count, tokens, metrics = run.forward_backward(step, batches)
            run.optimizer_step(step, total, count)
            run.record(step, tokens, metrics, lr, flops_per_token)
            done = step + 1
            if run.due(cfg.eval_every, done) and (val is not None or probes):
                run.evaluate(done, val, probes)
            if run.due(cfg.save_every, done):
                run.save(done, batches)
            run.check_signals(done, batches)
    return run.finish(batches, val, probes, flops_per_token)


class _Run:
    """The pieces of one `train` call, so that `train` reads as the loop it is."""

    def __init__(
        self, model: nn.Module, objective: Objective, cfg: TrainSettings, writer: Writer
    ) -> None:
        self.model, self.objective, self.cfg, self.writer = model, objective, cfg, writer
        self.device = next(model.parameters()).device
        self.world = distributed.current(self.device)
        objective.check(model)
        if cfg.activation_checkpointing:
            if not hasattr(model, "gradient_checkpointing"):
                raise UsageError("activation_checkpointing: this model does not support it")
            model.gradient_checkpointing = True
        model.train()
        self.net = distributed.wrap(model, self.world, cfg.distributed.strategy)
        self.optimizer = build_optimizer(
            model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps
        )
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.sched = Schedule(cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        self.fingerprint = {**writer.fingerprint, "world_size": self.world.size}
        # Saved with the state: a resumed run logs the same figures as an uninterrupted one,
        # also when a save falls inside a logging window (window_loss/window_steps).
        self.counters: dict[str, Any] = {
            "tokens_seen": 0,
            "train_loss": math.nan,
            "val_loss": None,
            "train_time_s": 0.0,
            "window_loss": 0.0,
            "window_steps": 0,
            "metrics": {},
            "val_metrics": {},
        }
        self.window_metrics = MetricSums(self.device)  # this rank's, until the window is logged
        self.start = 0
        self.saved_step: int | None = None
        self.gen = torch.Generator()
        self.recent: deque[float] = deque(maxlen=SPIKE_WINDOW)  # step losses, for spikes
        # An objective whose loss is no measure of progress (an RL surrogate, near 0 and of
        # either sign) sets `watch_spikes = False`: its "spikes" are not a sign of trouble.
        self.watch_spikes = getattr(objective, "watch_spikes", True)
        self.peak = peak_flops(self.device)
        self.window_tokens, self.window_start = 0, time.perf_counter()
        self.timed_steps, self.run_tokens, self.run_time = 0, 0, 0.0
        self.unclocked_tokens = 0
        self.began = self.mark = time.perf_counter()  # wall time of this process's run
        # On CUDA the finite checks stay on the device until the next log/eval/save (settle);
        # the fused AdamW kernel skips a step whose loss or gradient norm is not finite.
        # FSDP's gradients are DTensors, which device-side scaling would mix with plain
        # tensors: FSDP keeps the per-step check.
        fsdp = self.world.size > 1 and cfg.distributed.strategy == "fsdp"
        fused = bool(self.optimizer.defaults.get("fused"))
        self.deferred = self.device.type == "cuda" and fused and not fsdp
        self.pending: list[tuple[int, Any, Any]] = []  # (step, loss, grad norm) not yet read
        self.grad_norm = math.nan

    def due(self, every: int, done: int) -> bool:
        """Whether a periodic action (eval, save) falls after step `done`; the last step has
        its own (finish)."""
        return bool(every) and done % every == 0 and done < self.cfg.steps

    # --- restore and save -------------------------------------------------------------------

    def restore(self, batches: Batches) -> None:
        found = read_meta(self.writer.state_dir)
        if found is None:
            torch.manual_seed(self.cfg.seed + self.world.rank)  # dropout differs across ranks
            self.writer.rewind(0)
            return
        path, meta = found
        diff = config_diff(meta["fingerprint"], self.fingerprint)
        if diff:
            changes = "; ".join(
                f"{k}: {_get(meta['fingerprint'], k)!r} -> {_get(self.fingerprint, k)!r}"
                for k in diff
            )
            raise UsageError(
                f"{self.writer.dir}: holds an interrupted run with different settings "
                f"({changes}); rerun with the same settings to resume, or delete "
                f"{self.writer.dir} to start over"
            )
        restore(self.model, self.optimizer, path / TENSORS, meta)
        mine = meta["ranks"][self.world.rank]
        set_rng_state(mine["rng"])
        batches.load_state_dict(mine["batches"])
        self.window_metrics.load(mine.get("window_metrics", {}))
        self.start = self.saved_step = meta["step"]
        self.counters.update(meta["counters"])
        if self.world.main:
            info(f"resuming from step {self.start:,} of {self.cfg.steps:,} ({path})")
        self.writer.rewind(self.start)

    def save(self, step: int, batches: Batches) -> None:
        self.settle()  # a step whose loss was not finite stops the run before any save
        # A step whose loss and gradients were finite can still overflow the weights (a huge
        # lr): such weights must never replace the last good state.
        bad = sum(not bool(torch.isfinite(_local(p)).all()) for p in self.params)
        flag = torch.tensor([float(bad)], dtype=torch.float64, device=self.device)
        distributed.all_reduce_sum(flag)
        if flag.item():
            kept = f"step {self.saved_step:,}" if self.saved_step is not None else "none saved yet"
            raise NonFiniteLoss(
                f"step {step:,}: the optimizer step made {bad} parameter tensors non-finite; "
                f"they were not saved (last good state: {kept}, in {self.writer.state_dir})"
            )
        mine = {
            "rng": rng_state(),
            "batches": batches.state_dict(),
            "window_metrics": self.window_metrics.state(),
        }
        ranks = distributed.gather_json(mine, self.device)
        save_state(
            self.writer.state_dir,
            step=step,
            model=self.model,
            optimizer=self.optimizer,
            meta={"fingerprint": self.fingerprint, "ranks": ranks, "counters": self.counters},
            write=self.world.main,
        )
        distributed.barrier()
        self.saved_step = step
        self.window_start = self.mark = time.perf_counter()

    # --- one optimizer step -----------------------------------------------------------------

    @contextmanager
    def running(self) -> Iterator[None]:
        """Signals become a flag checked between steps; progress shows on the main rank."""
        total = self.cfg.steps - self.start
        with _Signals() as self.signals, _progress(self.world.main, total) as self.bar:
            yield

    def forward_backward(
        self, step: int, batches: Batches
    ) -> tuple[torch.Tensor, torch.Tensor, int, MetricSums]:
        """Run this step's micro-batches; returns (the loss summed over the step's items on all
        ranks, that item count — both 0-d device tensors, no host sync —, the positions
        processed here, this rank's metric sums)."""
        A, W, rank = self.cfg.grad_accum, self.world.size, self.world.rank
        acc = torch.zeros(2, dtype=torch.float64, device=self.device)
        metrics = MetricSums(self.device)
        tokens = 0
        for a in range(A):
            batch = {k: self._to_device(v) for k, v in next(batches).items()}
            self.gen.manual_seed(micro_seed(self.cfg.seed, (step * W + rank) * A + a))
            with distributed.no_sync(self.net, last=a == A - 1):
                with autocast(self.device, self.cfg.dtype):
                    out = self.objective(self.net, batch, self.gen)
                out.total.backward()
            acc[0] += out.total.detach()
            acc[1] += out.count
            tokens += out.tokens
            metrics.add(out.metrics)
        distributed.all_reduce_sum(acc)
        return acc[0], acc[1], tokens, metrics

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned, so the copy overlaps the previous step
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def optimizer_step(self, step: int, total: torch.Tensor, count: torch.Tensor) -> None:
        """Scale the gradients to d(mean loss), clip, step, unless the loss or the pre-clip
        gradient norm is not finite: then the weights are left as they were.

        On the CPU the check is made right here (a host sync costs nothing there) and stops
        the run before the step. On CUDA a sync per step would leave the GPU idle while the
        host queues the next step, so the check stays on the device: the fused AdamW kernel
        skips the update when `found_inf` is set, and `settle()` (at each log, evaluation,
        save and the end) raises for the first such step, before anything after it is saved."""
        W = self.world.size
        grads = [p.grad for p in self.params if p.grad is not None]
        clip = self.cfg.clip if self.cfg.clip > 0 else math.inf
        if not self.deferred:
            loss = (total / count).item() if count.item() else math.nan
            if not math.isfinite(loss):
                _stop(step, f"loss is {loss}", self.saved_step, self.writer, deferred=False)
            # DDP/FSDP average gradients over ranks; make them d(sum of losses)/d(w) / count.
            torch._foreach_mul_(grads, W / count.item())
            norm = _full(torch.nn.utils.clip_grad_norm_(self.params, clip))
            if not math.isfinite(float(norm)):
                _stop(step, f"gradient norm is {float(norm)}", self.saved_step, self.writer,
                      deferred=False)  # fmt: skip
        else:
            loss = total / count
            # One pass over the gradients instead of two: the norm of the summed-loss
            # gradients, scaled, gives the mean-loss norm; then one multiply by scale × clip.
            scale = (W / count).float()
            norm = _full(torch.nn.utils.get_total_norm(grads)) * scale
            coef = (clip / (norm + 1e-6)).clamp(max=1.0) if clip != math.inf else 1.0
            torch._foreach_mul_(grads, scale * coef)
            bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
            self.optimizer.found_inf = bad.float()  # read by the fused AdamW kernel
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending.append((step, loss, norm))

    def settle(self) -> None:
        """Bring the steps run since the last call to the host (one sync on CUDA): stop at the
        first non-finite one, warn on loss spikes, add the losses to the log window."""
        if not self.pending:
            return
        if self.deferred:
            values = torch.stack(
                [
                    torch.stack([torch.as_tensor(x).double() for x in row[1:]])
                    for row in self.pending
                ]
            ).tolist()
        else:
            values = [[float(loss), float(norm)] for _, loss, norm in self.pending]
        steps = [row[0] for row in self.pending]
        self.pending = []
        for step, (loss, norm) in zip(steps, values, strict=True):
            if not math.isfinite(loss):
                _stop(step, f"loss is {loss}", self.saved_step, self.writer, self.deferred)
            if not math.isfinite(norm):
                _stop(step, f"gradient norm is {norm}", self.saved_step, self.writer,
                      self.deferred)  # fmt: skip
            if (
                self.watch_spikes
                and self.world.main
                and self.recent
                and loss > SPIKE_FACTOR * max(self.recent) > 0
            ):
                warn(
                    f"step {step + 1:,}: loss spike: {loss:.4g} is over {SPIKE_FACTOR:g}× the "
                    f"largest of the last {len(self.recent)} steps ({max(self.recent):.4g}); "
                    "continuing"
                )
            self.recent.append(loss)
            self.counters["window_loss"] += loss
            self.grad_norm = norm
        self._clock()

    def _clock(self) -> None:
        """Add the wall time since the last mark to the step time (and, after the first step,
        which compiles and warms up, to the timed throughput); evaluations and saves are
        excluded by moving the mark past them."""
        now = time.perf_counter()
        elapsed = now - self.mark
        self.counters["train_time_s"] += elapsed
        if self.timed_steps > 1:
            self.run_time += elapsed
            self.run_tokens += self.unclocked_tokens
        self.unclocked_tokens = 0
        self.mark = now

    # --- logging and evaluation -------------------------------------------------------------

    def record(
        self, step: int, tokens: int, metrics: MetricSums, lr: float, flops_per_token: float
    ) -> None:
        """Count the step; write the log window when it is full."""
        c, W = self.counters, self.world.size
        done = step + 1
        step_tokens = tokens * W
        c["tokens_seen"] += step_tokens
        c["window_steps"] += 1
        self.window_metrics.add({name: (t[0], t[1]) for name, t in metrics.sums.items()})
        self.window_tokens += step_tokens
        self.timed_steps += 1
        if self.timed_steps == 1:
            self.settle()  # the first step (compilation, warm-up) is timed on its own
        else:
            self.unclocked_tokens += step_tokens
        if not self.deferred:
            self.settle()
        if done % self.cfg.log_every and done != self.cfg.steps:
            return
        self.settle()
        now = time.perf_counter()
        rate = self.window_tokens / max(now - self.window_start, 1e-9)
        c["train_loss"] = c["window_loss"] / c["window_steps"]
        c["metrics"] = self.window_metrics.means()
        record = {
            "step": done,
            "loss": c["train_loss"],
            "lr": lr,
            "grad_norm": self.grad_norm,
            "tokens": c["tokens_seen"],
            "tokens_per_s": round(rate, 1),
            **c["metrics"],
        }
        if self.peak and flops_per_token:
            record["mfu"] = round(rate * flops_per_token / (self.peak * W), 4)
        self.writer.log(record)
        fields = {"loss": f"{record['loss']:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{rate:,.0f}"}
        fields |= {k: f"{v:.4g}" for k, v in c["metrics"].items()}
        if "mfu" in record:
            fields["mfu"] = f"{record['mfu']:.1%}"
        self.bar.advance(c["window_steps"], **fields)
        c["window_loss"], c["window_steps"] = 0.0, 0
        self.window_metrics = MetricSums(self.device)
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def evaluate(
        self,
        step: int,
        val: Callable[[], Iterable[dict[str, torch.Tensor]]] | None,
        probes: Sequence[Probe],
    ) -> None:
        self.settle()
        record: dict[str, Any] = {"step": step}
        if val is not None:
            record["wall_s"] = round(time.perf_counter() - self.began, 3)
            res = evaluate(self.net, val(), self.objective, seed=self.cfg.seed,
                           precision=self.cfg.dtype)  # fmt: skip
            self.counters["val_loss"] = res.loss
            record |= {"val_loss": res.loss, "val_items": res.items}
            record |= {f"val_{k}": v for k, v in res.metrics.items()}
        if probes:  # probes see the model in eval mode, without gradients
            self.model.eval()
            try:
                with torch.no_grad():
                    for probe in probes:
                        record |= probe(self.model, step)
            finally:
                self.model.train()
        self.counters["val_metrics"] = {
            k: v for k, v in record.items() if k not in ("step", "wall_s")
        }
        self.writer.log(record)
        if self.world.main:
            shown = ", ".join(
                f"{k.replace('_', ' ')} {v:.4f}" for k, v in record.items()
                if k not in ("step", "val_items", "wall_s") and isinstance(v, float)
            )  # fmt: skip
            info(f"step {step:,}: {shown}")
        self.window_start = self.mark = time.perf_counter()

    def check_signals(self, done: int, batches: Batches) -> None:
        if _stop_requested(self.signals, self.world):
            self.save(done, batches)
            _interrupted(self.signals.received or signal.SIGTERM, done, self.writer)

    def finish(
        self,
        batches: Batches,
        val: Callable[[], Iterable[dict[str, torch.Tensor]]] | None,
        probes: Sequence[Probe],
        flops_per_token: float,
    ) -> TrainResult:
        cfg, c = self.cfg, self.counters
        self.settle()
        tokens_per_s = mfu = None
        if self.run_tokens:  # steps only: evaluations and saves are not counted
            tokens_per_s = self.run_tokens / max(self.run_time, 1e-9)
            if self.peak and flops_per_token:
                mfu = tokens_per_s * flops_per_token / (self.peak * self.world.size)
        evaluated = c["val_loss"] is not None or bool(c["val_metrics"])
        if (val is not None or probes) and (self.saved_step != cfg.steps or not evaluated):
            self.evaluate(cfg.steps, val, probes)
        if self.saved_step != cfg.steps:
            self.save(cfg.steps, batches)  # a crash while publishing resumes straight to the end
        return TrainResult(
            steps=cfg.steps,
            start_step=self.start,
            train_loss=c["train_loss"],
            val_loss=c["val_loss"],
            tokens_seen=c["tokens_seen"],
            tokens_per_s=tokens_per_s,
            mfu=mfu,
            train_time_s=c["train_time_s"],
            metrics=dict(c["metrics"]),
            val_metrics=dict(c["val_metrics"]),
        )


def _local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (FSDP2 parameters are DTensors)."""
    return p.to_local() if hasattr(p, "to_local") else p


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2 gradient norm) as a plain tensor; others unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _stop(step: int, what: str, saved_step: int | None, writer: Writer, deferred: bool) -> None:
    kept = (
        f"the last good state (step {saved_step:,}) is kept in {writer.state_dir}"
        if saved_step is not None
        else "no state had been saved yet"
    )
    done = (
        "its optimizer step was skipped and nothing after it was saved"
        if deferred
        else "stopped before the optimizer step, weights not updated"
    )
    raise NonFiniteLoss(
        f"step {step + 1:,}: {what}; {done}; {kept} (lower lr, raise warmup or check the data)"
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
