"""`llmctl finetune`: full-parameter instruction tuning of a `checkpoint`; writes a `checkpoint`.

Reads chat data (`data/chats.py`: messages, prompt+response, prompt+completion or Alpaca
records in JSON/JSONL files), renders it with the checkpoint's chat template and trains with
the next-token loss on the assistant tokens only (`loss_on=all` for every token), each
assistant turn ending in the end-of-turn token so the model learns to stop. Examples are
packed several to a row (attention and positions reset at each boundary) or padded. A
held-out split gives the val loss before the first step (the base's), every `eval_every`
steps and at the end. The output holds the tuned weights, the tokenizer files (with the chat
template it was trained with: the base's, or llmctl's default written in when the base has
none), `metrics.jsonl` and `rejected/errors.jsonl` (malformed records with file:line).
Resume, NaN stop, DDP/FSDP2 and progress come from the one training loop.

Example:
    llmctl finetune out/model recipes/data/sft --out out/sft --epochs 3 --lr 3e-4
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llmctl.artifacts import open_artifact, partial_dir
from llmctl.config import helpful, to_dict
from llmctl.data.chats import ChatDataConfig
from llmctl.errors import UsageError
from llmctl.runtime import info, summary, warn
from llmctl.train.settings import COSMETIC, TrainSettings, check_steps_or_epochs


@dataclass(frozen=True)
class FinetuneConfig(TrainSettings, ChatDataConfig):
    """Settings of `llmctl finetune`: the shared training keys, the data keys, and `epochs`."""

    steps: int = helpful(0, "optimizer steps (0 = as many as `epochs` passes over the data)")
    epochs: float = helpful(3.0, "passes over the training examples, when steps = 0")
    batch_size: int = helpful(8, "rows per micro-batch, per process (a row packs examples)")
    lr: float = helpful(1e-4, "peak learning rate")
    warmup: int = helpful(10, "linear warmup steps")
    weight_decay: float = helpful(0.0, "AdamW weight decay (matrices only)")
    eval_every: int = helpful(50, "validation every N steps (0 = only before and at the end)")
    save_every: int = helpful(50, "save resumable state every N steps (0 = only at the end)")
    qat: Literal["", "int4", "int8"] = helpful(
        "",
        "quantization-aware SFT: train with fake int4/int8 weights, publish the exact "
        "weight-only quantized checkpoint (as `quantize --method qat`)",
    )

    def __post_init__(self) -> None:
        check_steps_or_epochs(self, self.epochs)  # steps = 0 means "from epochs"
        ChatDataConfig.__post_init__(self)


def _qat(model: torch.nn.Module, cfg: FinetuneConfig, world: Any) -> Any:
    """With `qat` set: make the block Linears fake-quantized (int4 group-wise or int8 per
    channel, straight-through gradients) and return the spec to convert with at save."""
    if not cfg.qat:
        return None
    from llmctl.model.quant import QuantSpec, apply_qat

    if world.size > 1:
        raise UsageError("config key 'qat': quantization-aware finetuning runs in one process")
    spec = QuantSpec("qat", bits=4 if cfg.qat == "int4" else 8)
    n = apply_qat(model, spec)
    info(f"finetune: qat, {n} Linear layers fake-quantized to {cfg.qat}")
    return spec


def run(
    checkpoint: Path, data: list[Path], out: Path, cfg: FinetuneConfig, force: bool = False
) -> dict[str, Any]:
    """Tune `checkpoint` on the chat files `data` and publish a checkpoint at `out`; returns
    the manifest stats (empty on ranks > 0)."""
    from llmctl.data.chats import data_digest, prepare_chats, write_rejected
    from llmctl.model.io import load_model, save_checkpoint
    from llmctl.tokenizer import (
        CHAT_TEMPLATE,
        check_fits,
        load_specials,
        load_tokenizer,
        tokenizer_config_with_template,
    )
    from llmctl.train import distributed
    from llmctl.train.batches import StepBatches
    from llmctl.train.loop import first_evaluation
    from llmctl.train.objectives import NextToken
    from llmctl.train.run import train_and_publish

    ckpt = open_artifact(checkpoint, "checkpoint")
    tok = load_tokenizer(checkpoint)
    specials = load_specials(checkpoint)
    model = load_model(checkpoint)
    check_fits(tok, model.config.vocab_size, str(checkpoint))
    if not getattr(model.config, "causal", True):
        raise UsageError(f"{checkpoint}: a masked-LM (bidirectional) model cannot be tuned to chat")
    seq_len = cfg.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise UsageError(
            f"config key 'seq_len': {seq_len} > the model's max_seq_len {model.config.max_seq_len}"
        )
    if cfg.packing and "segment_ids" not in inspect.signature(model.forward).parameters:
        raise UsageError(
            f"{checkpoint}: this model type cannot keep packed examples apart "
            "(no segment_ids); use --set packing=false"
        )

    sets = prepare_chats(checkpoint, data, cfg, tok=tok, specials=specials, seq_len=seq_len,
                         batch_size=cfg.batch_size, seed=cfg.seed)  # fmt: skip
    rows, s = sets.train, sets.data.stats
    world = distributed.init(cfg.device)
    per_step = cfg.batch_size * cfg.grad_accum * world.size
    steps = cfg.steps or max(1, math.ceil(rows.rows_in_epochs(cfg.epochs) / per_step))
    tcfg = dataclasses.replace(cfg, steps=steps)
    val = sets.val_batches(cfg.eval_batches)
    if val is None and world.main:
        warn("no validation: too few examples to hold any out (val_fraction)")

    base_dtype = next(model.parameters()).dtype  # the output keeps it; training is fp32
    model = model.float()
    qspec = _qat(model, cfg, world)
    model = model.to(world.device)
    batches = StepBatches(rows.sample, accum=cfg.grad_accum, rank=world.rank, world=world.size)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in COSMETIC}
    files = sets.files
    fingerprint = {"config": settings, "checkpoint": ckpt.digest, "data": data_digest(files)}
    if world.main:
        n = sum(p.numel() for p in model.parameters())
        info(f"finetune: {checkpoint} ({n / 1e6:.2f}M params), {s['examples']:,} examples "
             f"({len(rows.examples):,} train) from {len(files)} file(s), "
             f"{rows.rows_per_epoch():,} rows of {rows.row_len} per epoch, "
             f"{steps:,} steps")  # fmt: skip

    tokenizer_config = tokenizer_config_with_template(
        checkpoint, None if sets.base_template else CHAT_TEMPLATE
    )
    if tokenizer_config is None:
        warn(f"{checkpoint}: no tokenizer_config.json; the chat template is not recorded")

    def save(dir: Path, final: torch.nn.Module) -> None:
        extra: dict[str, Path | bytes] = {"tokenizer.json": checkpoint / "tokenizer.json"}
        if tokenizer_config is not None:
            extra["tokenizer_config.json"] = tokenizer_config
        final = final.to(base_dtype)
        if qspec is not None:  # fake-quant layers become their exact weight-only form
            from llmctl.model.quant import quantize

            quantize(final.cpu(), qspec)
        save_checkpoint(dir, final, extra)
        write_rejected(dir, sets.data.rejected)

    def stats(result: Any) -> dict[str, Any]:
        base = first_evaluation(partial_dir(out) / "metrics.jsonl").get("val_loss")
        return {
            "base_val_loss": base,
            "params": sum(p.numel() for p in model.parameters()),
            "seq_len": seq_len,
            "loss_on": cfg.loss_on,
            "packing": cfg.packing,
            "examples_train": len(rows.examples),
            "examples_val": len(sets.val.examples) if sets.val else 0,
            "rows_per_epoch": rows.rows_per_epoch(),
            "row_fill": round(rows.fill(), 4),
            "epochs": round(rows.epoch_of(steps * per_step), 4),
            "chat_template": (
                "base" if sets.base_template else "llmctl default (written into output)"
            ),
            **{k: v for k, v in s.items() if k != "files"},
            "data_files": s["files"],
        }

    inputs = {"checkpoint": checkpoint, **{f"input-{i}": f for i, f in enumerate(files)}}
    result = train_and_publish(
        out,
        world=world,
        model=model,
        batches=batches,
        objective=NextToken(),
        cfg=tcfg,
        fingerprint=fingerprint,
        command="finetune",
        config=to_dict(cfg),
        inputs=inputs,
        save=save,
        stats=stats,
        val=val,
        flops_per_token=model.flops_per_token(seq_len) if hasattr(model, "flops_per_token") else 0,
        eval_first=True,
        force=force,
    )
    if world.main:
        _summary(out, result)
    return result


def _summary(out: Path, s: dict[str, Any]) -> None:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    rejected = s["rejected_total"]
    reasons = ", ".join(f"{k} {v}" for k, v in s["rejected"].items())
    rows = [
        ("examples", f"{s['examples']:,} ({s['examples_train']:,} train, "
                     f"{s['examples_val']:,} val) of {s['records']:,} records"),
        ("rejected", f"{rejected:,}" + (f" ({reasons})" if reasons else "")),
        ("cut", f"prompt {s['prompt_cut']:,}, answer {s['answer_cut']:,}; "
                f"no assistant token left: {s['no_assistant_tokens']:,}"),
        ("rows", f"{s['rows_per_epoch']:,}/epoch, {s['row_fill']:.0%} filled "
                 f"({'packed' if s['packing'] else 'padded'})"),
        ("steps", f"{s['steps']:,}" + (f" from {s['start_step']:,}" if s["start_step"] else "")
                  + f" ({s['epochs']} epochs)"),
        ("val loss", f"{f(s['base_val_loss'])} (base) → {f(s['val_loss'])}"),
        ("train loss", f(s["train_loss"])),
        ("tokens/s", ("-" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:,.0f}")
                     + f" on {s['world_size']} × {s['device']}"),
        ("checkpoint", str(out)),
    ]  # fmt: skip
    summary(f"finetune → {out}", rows)
