"""`llmctl lora`: train LoRA adapters on a frozen checkpoint; write an `adapter`. Or merge one.

Training reads a `checkpoint` and DATA: a `tokens` artifact (plain language-model adaptation,
next-token loss on every token), or instruction files (JSON/JSONL of chats, prompt/response or
Alpaca records; rendered, masked and packed as `finetune` does, loss on assistant tokens). The
targeted Linear layers get a LoRA branch (model/lora.py); the base stays frozen, so only the
adapter reaches the optimizer and the resumable state, and the base's manifest digest is part
of the run's fingerprint (a resume on another base is refused). The artifact holds
`adapter_model.safetensors` and `adapter_config.json` in PEFT's layout under the module names
of the base's transformers export (model/adapter.py), plus `metrics.jsonl`; the manifest's
stats record trainable and total parameters.

`llmctl lora CHECKPOINT --merge ADAPTER --out DIR` writes the merged `checkpoint` with the one
merge function `generate --adapter` also uses, so both give the same weights.

Example:
    llmctl lora out/ckpt out/tokens --out out/lora --rank 8 --steps 200
    llmctl lora out/ckpt --merge out/lora --out out/merged
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmctl.artifacts import building, is_artifact, open_artifact, partial_dir
from llmctl.config import helpful, to_dict
from llmctl.data.chats import ChatDataConfig
from llmctl.errors import UsageError
from llmctl.runtime import human_bytes, info, seed_everything, summary, warn
from llmctl.train.settings import COSMETIC, TrainSettings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class LoraConfig(TrainSettings, ChatDataConfig):
    """Settings of `llmctl lora`: the shared training keys, how instruction data is read (as
    `finetune`), and the adapter's shape."""

    rank: int = helpful(8, "LoRA rank r of every adapted layer")
    alpha: float = helpful(16.0, "LoRA alpha: the update B @ A is scaled by alpha / rank")
    dropout: float = helpful(0.05, "dropout on the input of the LoRA branch")
    rslora: bool = helpful(False, "scale by alpha / sqrt(rank) (rank-stabilized LoRA)")
    targets: list[str] = helpful(
        ["attn"],
        "layers to adapt: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj lm_head "
        "(GPT); att.key att.value att.receptance att.output ffn.key ffn.value ffn.receptance "
        "lm_head (RWKV: attn = time mixing, mlp = channel mixing); or the groups attn, mlp, all",
    )
    weight_decay: float = helpful(0.0, "AdamW weight decay of the adapter matrices")
    epochs: float = helpful(
        0.0, "instruction data: train this many passes over the examples instead of `steps`"
    )

    def __post_init__(self) -> None:
        TrainSettings.__post_init__(self)
        try:
            ChatDataConfig.__post_init__(self)
        except ValueError as e:
            raise UsageError(f"config: {e}") from None
        if self.rank < 1:
            raise UsageError(f"config key 'rank': must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"config key 'dropout': must be in [0, 1), got {self.dropout}")
        if self.alpha <= 0:
            raise UsageError(f"config key 'alpha': must be > 0, got {self.alpha}")
        if self.epochs < 0:
            raise UsageError(f"config key 'epochs': must be >= 0, got {self.epochs}")


def _tokenizer_sha(m: Any) -> str | None:
    return m.files.get("tokenizer.json", {}).get("sha256")


def run(
    checkpoint: Path, data: list[Path], out: Path, cfg: LoraConfig, force: bool = False
) -> dict[str, Any]:
    """Train LoRA adapters for `checkpoint` on `data` and publish an adapter at `out`;
    returns the manifest stats."""
    from llmctl.data.chats import write_rejected
    from llmctl.model.adapter import save_adapter
    from llmctl.model.io import build_model, load_model
    from llmctl.model.lora import apply_lora, describe_lora, trainable_params
    from llmctl.tokenizer import check_fits, load_tokenizer
    from llmctl.train import distributed
    from llmctl.train.batches import StepBatches
    from llmctl.train.loop import first_evaluation
    from llmctl.train.objectives import NextToken
    from llmctl.train.run import train_and_publish

    ckpt = open_artifact(checkpoint, "checkpoint")
    world = distributed.init(cfg.device)
    model = load_model(checkpoint, device=world.device)
    mcfg = model.config
    check_fits(load_tokenizer(checkpoint), mcfg.vocab_size, str(checkpoint))
    packed = cfg.packing and not any(is_artifact(p) for p in data)
    if packed and "segment_ids" not in inspect.signature(model.forward).parameters:
        raise UsageError(
            f"{checkpoint}: this model type cannot keep packed examples apart (no "
            "segment_ids); use --set packing=false"
        )
    seq_len = cfg.seq_len or mcfg.max_seq_len
    if seq_len > mcfg.max_seq_len:
        raise UsageError(
            f"config key 'seq_len': {seq_len} > the checkpoint's max_seq_len {mcfg.max_seq_len}"
        )
    source, val, data_info = _data(data, ckpt, cfg, seq_len, world)
    cfg = data_info.get("cfg", cfg)  # steps from epochs
    seed_everything(cfg.seed)  # A's random init
    try:
        adapted = apply_lora(model, cfg.targets, cfg.rank, cfg.alpha, cfg.dropout, cfg.rslora)
    except ValueError as e:
        raise UsageError(f"config key 'targets': {e}") from None
    trainable, total = trainable_params(model)
    block = describe_lora(model)
    batches = StepBatches(source, accum=cfg.grad_accum, rank=world.rank, world=world.size)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in COSMETIC}
    fingerprint = {"config": settings, "base": ckpt.digest, "data": data_info["digests"]}
    step_tokens = cfg.batch_size * cfg.grad_accum * world.size * seq_len
    if world.main:
        info(f"lora: {len(adapted)} layers, rank {cfg.rank}, {trainable:,} of {total:,} "
             f"parameters train ({trainable / total:.2%}); {data_info['what']}; "
             f"{world.size} × {world.device}, {cfg.steps:,} steps × {step_tokens:,} "
             "tokens")  # fmt: skip
    extra = data_info.get("files", {})

    def save(dir: Path, final: torch.nn.Module) -> None:
        try:
            save_adapter(dir, final, base_digest=ckpt.digest, base_path=str(ckpt.path),
                         dropout=cfg.dropout)  # fmt: skip
        except ValueError as e:
            raise UsageError(f"{out}: {e}") from None
        for name, content in extra.items():
            (dir / name).write_bytes(content)
        if "rejected" in data_info:
            write_rejected(dir, data_info["rejected"])

    base_bytes = ckpt.files.get("model.safetensors", {}).get("bytes", 0)
    stats = train_and_publish(
        out,
        world=world,
        model=model,
        batches=batches,
        objective=NextToken(),
        cfg=cfg,
        fingerprint=fingerprint,
        command="lora",
        kind="adapter",
        config=to_dict(cfg),
        inputs={"checkpoint": ckpt.path, **{f"input-{i}": p for i, p in enumerate(data)}},
        save=save,
        stats=lambda result: {
            "params_trainable": trainable,
            "params_total": total,
            "trainable_share": trainable / total,
            "adapted_layers": len(adapted),
            "seq_len": seq_len,
            "tokens_per_step": step_tokens,
            "base_digest": ckpt.digest,
            "base_bytes": base_bytes,
            # evaluated before the first step: the untrained adapter adds exactly 0
            "base_val_loss": first_evaluation(partial_dir(out) / "metrics.jsonl").get("val_loss"),
            **data_info["stats"],
        },
        val=val,
        flops_per_token=model.flops_per_token(seq_len),
        rebuild=lambda: build_model(mcfg, {"lora": block}),
        eval_first=True,
        force=force,
    )
    if world.main:
        adapter_bytes = (out / "adapter_model.safetensors").stat().st_size
        _summary(out, stats, adapter_bytes)
    return stats


def _data(
    data: list[Path], ckpt: Any, cfg: LoraConfig, seq_len: int, world: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """(source(i) of micro-batches, val() or None, facts: digests, what, stats, files)."""
    tokens = [p for p in data if is_artifact(p)]
    if tokens:
        if len(data) != 1:
            raise UsageError(
                f"{tokens[0]}: give one tokens artifact alone, or instruction files (not both)"
            )
        return _token_data(data[0], ckpt, cfg, seq_len, world)
    return _instruction_data(data, ckpt, cfg, seq_len, world)


def _token_data(
    path: Path, ckpt: Any, cfg: LoraConfig, seq_len: int, world: Any
) -> tuple[Any, Any, dict[str, Any]]:
    from llmctl.tokenizer import load_specials
    from llmctl.train.batches import token_streams

    tokens = open_artifact(path, "tokens")
    if cfg.epochs:
        raise UsageError("config key 'epochs': for instruction files; on tokens give steps")
    if _tokenizer_sha(tokens) != _tokenizer_sha(ckpt):
        raise UsageError(f"{path}: its tokenizer.json differs from the checkpoint's {ckpt.path}")
    specials = load_specials(ckpt.path)

    train_stream, val = token_streams(
        tokens.path, batch_size=cfg.batch_size, span=seq_len, seed=cfg.seed,
        eval_batches=cfg.eval_batches, eos_id=specials.eos, reader="the checkpoint's tokenizer",
    )  # fmt: skip
    n = cfg.steps * cfg.grad_accum * world.size
    facts = {
        "digests": [tokens.digest],
        "what": f"tokens {tokens.path}",
        "stats": {"data": "tokens", "epochs": round(train_stream.epoch_of(n), 4)},
    }
    return train_stream.sample, val, facts


def _instruction_data(
    files: list[Path], ckpt: Any, cfg: LoraConfig, seq_len: int, world: Any
) -> tuple[Any, Any, dict[str, Any]]:
    """Instruction files exactly as `finetune` reads them (`data/chats.prepare_chats`): the
    checkpoint's chat template (llmctl's default when it has none, then written into the
    adapter as tokenizer_config.json so a merge carries it), assistant-only loss mask, packed
    or padded rows of seq_len + 1 tokens, a held-out split for validation."""
    import dataclasses
    import math

    from llmctl.data.chats import data_digest, prepare_chats
    from llmctl.tokenizer import load_specials, load_tokenizer

    tok = load_tokenizer(ckpt.path)
    specials = load_specials(ckpt.path)
    sets = prepare_chats(ckpt.path, files, cfg, tok=tok, specials=specials, seq_len=seq_len,
                         batch_size=cfg.batch_size, seed=cfg.seed)  # fmt: skip
    rows, s = sets.train, sets.data.stats
    per_step = cfg.batch_size * cfg.grad_accum * world.size
    if cfg.epochs:
        cfg = dataclasses.replace(
            cfg, steps=max(1, math.ceil(rows.rows_in_epochs(cfg.epochs) / per_step))
        )
    val = sets.val_batches(cfg.eval_batches)
    if val is None and world.main:
        warn("no validation: too few examples to hold any out (val_fraction)")
    extra: dict[str, bytes] = {}
    if sets.data.rejected:
        warn(f"skipped {len(sets.data.rejected)} malformed records: {s['rejected']}")
    if sets.base_template is None:  # the template the adapter was trained with travels with it
        path = ckpt.path / "tokenizer_config.json"
        tcfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        text = json.dumps({**tcfg, "chat_template": sets.template}, indent=2, ensure_ascii=False)
        extra["tokenizer_config.json"] = (text + "\n").encode()
    stats = {
        "data": "instructions",
        **{k: v for k, v in s.items() if k != "files"},
        "examples_train": len(rows.examples),
        "examples_val": len(sets.val.examples) if sets.val else 0,
        "rows_per_epoch": rows.rows_per_epoch(),
        "row_fill": round(rows.fill(), 4),
        "epochs": round(rows.epoch_of(cfg.steps * per_step), 4),
        "chat_template": "base" if sets.base_template else "llmctl default (in the adapter)",
    }
    facts = {
        "digests": data_digest(sets.files),
        "what": f"{s['examples']:,} instruction examples ({len(rows.examples):,} train)",
        "stats": stats,
        "files": extra,
        "rejected": sets.data.rejected,
        "cfg": cfg,
    }
    return rows.sample, val, facts


def merge(checkpoint: Path, adapter: Path, out: Path, force: bool = False) -> dict[str, Any]:
    """Merge `adapter` into `checkpoint` and publish the result as a checkpoint at `out`, in the
    checkpoint's dtype; the tokenizer files come from the checkpoint, except a
    `tokenizer_config.json` (chat template) the adapter was trained with."""
    from llmctl.model.adapter import merge_adapter
    from llmctl.model.io import load_model, save_checkpoint

    ckpt = open_artifact(checkpoint, "checkpoint")
    if is_artifact(adapter):
        open_artifact(adapter, "adapter")
    try:
        model = load_model(checkpoint)
        quantized = getattr(model, "quantization", None)
        if quantized is not None:
            # no exact merge into integers: merge into the dequantized weights instead
            from llmctl.model.quant import dequantize_model

            dequantize_model(model)
            method = quantized["method"]
            warn(
                f"{checkpoint} is quantized ({method}): the adapter is merged into its "
                "dequantized weights; the result is a full-precision checkpoint"
            )
        merged = merge_adapter(model, adapter, base_digest=ckpt.digest)
    except ValueError as e:
        raise UsageError(str(e)) from None
    files = {n: ckpt.path / n for n in TOKENIZER_FILES if (ckpt.path / n).is_file()}
    if (adapter / "tokenizer_config.json").is_file():
        files["tokenizer_config.json"] = adapter / "tokenizer_config.json"
    inputs = {"checkpoint": ckpt.path, "adapter": adapter}
    config = {"merge": str(adapter)}
    with building(out, kind="checkpoint", command="lora", config=config, inputs=inputs,
                  force=force) as art:  # fmt: skip
        save_checkpoint(art.dir, model, files)
        art.stats.update({"merged_layers": len(merged), "base_digest": ckpt.digest})
    summary(f"lora --merge → {out}", [
        ("base", str(ckpt.path)),
        ("adapter", str(adapter)),
        ("merged layers", f"{len(merged)}"),
    ])  # fmt: skip
    return art.stats


def _summary(out: Path, s: dict[str, Any], adapter_bytes: int) -> None:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    share = f"{s['params_trainable']:,} of {s['params_total']:,} ({s['trainable_share']:.2%})"
    size = f"{out} ({human_bytes(adapter_bytes)}"
    if s["base_bytes"]:
        size += f", {adapter_bytes / s['base_bytes']:.2%} of the checkpoint"
    rows = [
        ("trainable params", share),
        ("adapted layers", f"{s['adapted_layers']}"),
        ("steps", f"{s['steps']:,}" + (f" from {s['start_step']:,}" if s["start_step"] else "")),
        ("tokens seen", f"{s['tokens_seen']:,}"),
        ("train loss", f(s["train_loss"], ".4f")),
        ("val loss", f(s["base_val_loss"], ".4f") + " (base) → " + f(s["val_loss"], ".4f")),
        ("tokens/s", f(s["tokens_per_s"], ",.0f") + f" on {s['world_size']} × {s['device']}"),
        ("adapter", size + ")"),
    ]  # fmt: skip
    summary(f"lora → {out}", rows)
