"""The one source of training settings: every training command's config subclasses these.

`TrainSettings` holds the flat keys every training command shares (`steps`, `batch_size`,
`lr`, `warmup`, `seed`, `eval_every`, `save_every`, `log_every`, ...), so `--set lr=3e-4` means
the same in `pretrain`, `finetune`, `lora`, `align`, `distill` and `quantize --method qat`.
A command changes a default by redeclaring the field in its subclass; it never keeps a second
copy of the loop's settings. `train.loop.train` reads these fields directly.

Example:
    @dataclass(frozen=True)
    class FinetuneConfig(TrainSettings):
        lr: float = helpful(1e-4, "peak learning rate")   # a different default, same key
    cfg = load_config(FinetuneConfig, None, ["steps=50"])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmctl.config import helpful, nested
from llmctl.errors import UsageError

# Settings that change how often things are written or shown, never the numbers: a resumed
# run may change them, so they are left out of the resume fingerprint.
COSMETIC = ("log_every", "save_every", "eval_every", "eval_batches")


@dataclass(frozen=True)
class DistributedSettings:
    """How several processes (under torchrun) share the work."""

    strategy: Literal["ddp", "fsdp"] = helpful(
        "ddp", "ddp: full replicas; fsdp: FSDP2 shards parameters, gradients, optimizer state"
    )


@dataclass(frozen=True)
class TrainSettings:
    """How to optimize: the keys every training command shares."""

    steps: int = helpful(1000, "optimizer steps")
    batch_size: int = helpful(16, "sequences (or examples) per micro-batch, per process")
    grad_accum: int = helpful(1, "micro-batches per optimizer step")
    seq_len: int = helpful(0, "tokens per sequence (0 = the model's max_seq_len)")
    lr: float = helpful(1e-3, "peak learning rate")
    min_lr_ratio: float = helpful(0.1, "cosine decay ends at lr * min_lr_ratio")
    warmup: int = helpful(100, "linear warmup steps")
    weight_decay: float = helpful(0.1, "AdamW weight decay (matrices only)")
    betas: list[float] = helpful([0.9, 0.95], "AdamW betas")
    eps: float = helpful(1e-8, "AdamW epsilon")
    clip: float = helpful(1.0, "max global gradient norm (0 = no clipping; the norm is logged)")
    seed: int = helpful(0, "seed of initialization, data order and every random draw")
    device: Literal["auto", "cpu", "cuda"] = helpful("auto", "auto: CUDA when available")
    dtype: Literal["auto", "float32", "bfloat16"] = helpful(
        "auto", "auto: bf16 autocast on CUDA, fp32 on CPU (weights stay fp32)"
    )
    compile: bool = helpful(False, "torch.compile the model")
    activation_checkpointing: bool = helpful(False, "recompute blocks in backward (less memory)")
    eval_every: int = helpful(100, "validation (and probes) every N steps (0 = only at the end)")
    eval_batches: int = helpful(20, "validation batches per evaluation")
    save_every: int = helpful(100, "save resumable state every N steps (0 = only at the end)")
    log_every: int = helpful(10, "metrics.jsonl line and progress update every N steps")
    distributed: DistributedSettings = nested(DistributedSettings, "multi-process training")

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum", "batch_size", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"config key '{name}': must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "save_every", "clip", "seq_len", "seed"):
            if getattr(self, name) < 0:
                raise UsageError(f"config key '{name}': must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise UsageError("config keys 'lr' > 0 and 0 <= 'min_lr_ratio' <= 1 are required")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UsageError(f"config key 'betas': two numbers in [0, 1), got {self.betas}")


def check_steps_or_epochs(cfg: TrainSettings, epochs: float) -> None:
    """The shared checks for a config whose `steps = 0` means "from `epochs`" (finetune,
    align): steps >= 0, one of the two positive, then `TrainSettings`' checks as if steps
    were a real count."""
    if cfg.steps < 0:
        raise UsageError(f"config key 'steps': must be >= 0, got {cfg.steps}")
    if cfg.steps == 0 and not epochs > 0:
        raise UsageError("config keys 'steps' and 'epochs': give steps > 0 or epochs > 0")
    steps = cfg.steps
    object.__setattr__(cfg, "steps", steps or 1)
    try:
        TrainSettings.__post_init__(cfg)
    finally:
        object.__setattr__(cfg, "steps", steps)
