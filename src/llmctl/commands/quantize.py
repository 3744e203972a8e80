"""`llmctl quantize`: a smaller checkpoint from a trained one, with a before/after report.

Methods (see `model/quant.py` for the arithmetic and the on-disk layout):
`int8` weight-only per channel; `int4` weight-only group-wise (`--group-size`, 64; zero points
with `--set zero_point=true`); `dynamic` int8 weights and per-token int8 activations; `static`
int8 weights and activations with activation scales calibrated on `--calib` (a tokens artifact,
its train split, or documents); `qat` fine-tunes with fake int4/int8 weights (`--bits`) on the
`--calib` tokens artifact for `--steps` steps through the shared training loop, then writes the
exact int4/int8 weight-only form. The token embedding (and the lm head, tied or not) is int8 per
row unless `--set quantize_embeddings=false`.

The manifest's stats hold the report, also printed: file size, val loss and bits per byte (on
`--eval` data; by default the val split of the tokens artifact the base was trained on, found
through the manifest lineage; with neither: "no eval data"), and CPU decode tokens/s at batch 1
(greedy, KV cache, in the dtype `generate` would use), for the base and the quantized model.

Example:
    llmctl quantize out/ckpt --out out/ckpt-int4 --method int4
    llmctl quantize out/ckpt --out out/ckpt-static --method static --calib out/tokens
    llmctl quantize out/ckpt --out out/ckpt-qat --method qat --bits 4 --calib out/tokens --steps 200
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from llmctl.artifacts import building, open_artifact
from llmctl.config import helpful, to_dict
from llmctl.data.docs import ReadOptions
from llmctl.data.heldout import is_tokens, lineage_tokens, split_ids, token_ids, windows
from llmctl.errors import UsageError
from llmctl.runtime import human_bytes, info, summary, warn
from llmctl.scoring import decode_speed, loss_and_bits_per_byte
from llmctl.train.settings import COSMETIC, TrainSettings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class QuantizeConfig(TrainSettings, ReadOptions):
    """Settings of `llmctl quantize`. The training keys (steps, lr, batch_size, ...) are the
    shared `TrainSettings`, used by `--method qat`; batch_size and seq_len also shape the
    calibration and eval windows."""

    method: Literal["int8", "int4", "dynamic", "static", "qat"] = helpful(
        "int8", "int8 | int4 (weight-only), dynamic | static (int8 activations too), qat"
    )
    group_size: int = helpful(64, "int4: inputs per scale (a positive even number)")
    zero_point: bool = helpful(False, "int4: asymmetric groups with a zero point each")
    quantize_embeddings: bool = helpful(True, "int8 per row for the token embedding and lm head")
    observer: Literal["minmax", "percentile"] = helpful(
        "percentile", "static: activation range from the largest |x| or a percentile of |x|"
    )
    percentile: float = helpful(99.99, "static with observer=percentile: which percentile")
    calib_tokens: int = helpful(32768, "static: calibration tokens")
    bits: int = helpful(4, "qat: 4 or 8 (weight-only int4 group-wise or int8 per channel)")
    eval_tokens: int = helpful(65536, "report: score at most this many eval tokens (0 = all)")
    decode_tokens: int = helpful(64, "report: tokens decoded to time batch-1 decoding (0 = skip)")
    # the shared training keys, with QAT's defaults: a short, gentle fine-tune
    steps: int = helpful(200, "qat: optimizer steps")
    batch_size: int = helpful(8, "qat and calibration: sequences per batch")
    lr: float = helpful(1e-4, "qat: peak learning rate")
    warmup: int = helpful(20, "qat: linear warmup steps")
    weight_decay: float = helpful(0.0, "qat: AdamW weight decay")
    eval_every: int = helpful(0, "qat: validation every N steps (0 = none)")
    save_every: int = helpful(50, "qat: save resumable state every N steps")

    def __post_init__(self) -> None:
        super().__post_init__()
        g = self.group_size
        if isinstance(g, bool) or g < 2 or g % 2:
            raise UsageError(f"config key 'group_size': must be a positive even number, got {g}")
        if self.bits not in (4, 8):
            raise UsageError(f"config key 'bits': must be 4 or 8, got {self.bits}")
        if not 0 < self.percentile <= 100:
            raise UsageError(f"config key 'percentile': must be in (0, 100], got {self.percentile}")
        if self.calib_tokens < 1:
            raise UsageError("config key 'calib_tokens': must be >= 1")
        for name in ("eval_tokens", "decode_tokens"):
            if getattr(self, name) < 0:
                raise UsageError(f"config key '{name}': must be >= 0")


def spec_of(cfg: QuantizeConfig) -> Any:
    from llmctl.model.quant import QuantSpec

    return QuantSpec(cfg.method, cfg.group_size, cfg.zero_point, cfg.quantize_embeddings, cfg.bits)


# ---------------------------------------------------------------------------- measures


def _read_ids(
    data: Path, checkpoint: Path, tok: Any, cfg: QuantizeConfig, split: str, limit: int
) -> tuple[np.ndarray, str]:
    if not data.exists():
        raise UsageError(f"{data}: not found")
    return token_ids([data], checkpoint, tok, cfg, split, limit)


def measure(
    model: Any,
    ids: np.ndarray | None,
    tok: Any,
    seq_len: int,
    cfg: QuantizeConfig,
    dtype: torch.dtype | None,
    special: np.ndarray,
) -> dict[str, Any]:
    """The report's figures for one model: val loss and bits per byte (None without eval
    data) and batch-1 decode tokens/s."""
    out: dict[str, Any] = {"val_loss": None, "bits_per_byte": None}
    if ids is not None:
        out.update(loss_and_bits_per_byte(model, ids, tok, seq_len, special))
    speed = decode_speed(model, cfg.decode_tokens, dtype) if cfg.decode_tokens else None
    out["decode_tokens_per_s"] = speed
    return out


# ---------------------------------------------------------------------------- QAT


def train_qat(
    model: Any,
    calib: Path,
    checkpoint: Any,
    cfg: QuantizeConfig,
    spec: Any,
    art_dir: Path,
    seq_len: int,
) -> dict[str, Any]:
    """Fine-tune `model` with fake-quantized block Linears on `calib`'s train split."""
    from llmctl.data.tokens import TokenStream
    from llmctl.model.quant import apply_qat
    from llmctl.train import distributed
    from llmctl.train.batches import StepBatches
    from llmctl.train.loop import Writer, train
    from llmctl.train.objectives import NextToken

    if not is_tokens(calib):
        raise UsageError(f"--calib {calib}: qat trains on a tokens artifact (from llmctl tokenize)")
    split_ids(calib, checkpoint.path, "train", 1)  # same tokenizer as the checkpoint
    world = distributed.init(cfg.device)
    n = apply_qat(model, spec)
    model.to(world.device)
    stream = TokenStream(calib, "train", cfg.batch_size, seq_len, cfg.seed)
    tokens = open_artifact(calib, "tokens", verify=False)
    settings = {k: v for k, v in to_dict(cfg).items() if k not in COSMETIC}
    fingerprint = {"config": settings, "base": checkpoint.digest, "calib": tokens.digest}
    info(
        f"qat: {n} Linear layers fake-quantized to int{cfg.bits}, {cfg.steps:,} steps × "
        f"{cfg.batch_size * seq_len:,} tokens on {world.device}"
    )
    writer = Writer(art_dir, fingerprint)
    result = train(model, StepBatches(stream.sample), NextToken(), cfg, writer)
    model.cpu()
    for p in model.parameters():
        p.requires_grad_(False)
    return {
        "steps": result.steps,
        "train_loss": result.train_loss,
        "tokens_seen": result.tokens_seen,
        "train_time_s": result.train_time_s,
    }


# ---------------------------------------------------------------------------- run


def run(
    checkpoint: Path,
    out: Path,
    cfg: QuantizeConfig,
    calib: Path | None = None,
    eval_data: Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Quantize `checkpoint` into a new checkpoint at `out`; returns the manifest stats."""
    from llmctl.model.io import WEIGHTS_FILE, load_model, save_checkpoint
    from llmctl.model.quant import calibrate, layer_groups, quantize, quantized_modules
    from llmctl.model.sample import decode_dtype
    from llmctl.tokenizer import check_fits, load_specials, load_tokenizer

    if cfg.method in ("static", "qat") and calib is None:
        what = "a tokens artifact or documents" if cfg.method == "static" else "a tokens artifact"
        raise UsageError(f"--method {cfg.method} needs calibration data: --calib DATA ({what})")
    base = open_artifact(checkpoint, "checkpoint")
    model = load_model(checkpoint)
    if getattr(model, "quantization", None) is not None:
        raise UsageError(f"{checkpoint}: is already quantized ({model.quantization['method']})")
    if not model.config.causal:
        raise UsageError(f"{checkpoint}: a bidirectional (masked-LM) model cannot be reported on")
    tok = load_tokenizer(checkpoint)
    check_fits(tok, model.config.vocab_size, str(checkpoint))
    special = np.array(sorted(load_specials(checkpoint).all), dtype=np.int64)
    spec = spec_of(cfg)
    seq_len = min(cfg.seq_len or model.config.max_seq_len, model.config.max_seq_len)

    eval_path = eval_data or lineage_tokens(checkpoint)
    ids, eval_source = None, "no eval data"
    if eval_path is not None:
        ids, eval_source = _read_ids(eval_path, checkpoint, tok, cfg, "val", cfg.eval_tokens)
        if len(ids) < 2:
            if eval_data is not None:
                raise UsageError(f"{eval_data}: fewer than 2 tokens to score")
            ids, eval_source = None, f"no eval data ({eval_path} has no val tokens)"
    if ids is None and eval_data is None:
        warn("no eval data: pass --eval DATA for loss and bits per byte before/after")
    dtype = decode_dtype("auto", "cpu")
    dtype_name = "float32" if dtype is None else str(dtype).removeprefix("torch.")

    info(f"quantize: measuring the base model ({checkpoint})")
    before = measure(model, ids, tok, seq_len, cfg, dtype, special)
    inputs: dict[str, Path] = {"checkpoint": checkpoint}
    if calib is not None:
        inputs["calib"] = calib
    if eval_data is not None:
        inputs["eval"] = eval_data
    with building(
        out,
        kind="checkpoint",
        command="quantize",
        config=to_dict(cfg),
        inputs=inputs,
        force=force,
        resume=cfg.method == "qat",
    ) as art:
        extra: dict[str, Any] = {}
        scales = None
        if cfg.method == "static":
            assert calib is not None
            cids, csource = _read_ids(calib, checkpoint, tok, cfg, "train", cfg.calib_tokens)
            if len(cids) < seq_len:
                seq = max(len(cids), 2)
                warn(f"{csource}: only {len(cids):,} calibration tokens; windows of {seq}")
            batches = windows(cids, min(seq_len, max(len(cids), 2)), cfg.batch_size)
            if not batches:
                raise UsageError(f"--calib {calib}: no calibration tokens")
            scales = calibrate(model, batches, cfg.observer, cfg.percentile)
            extra["calibration"] = {
                "data": csource,
                "tokens": int(sum(b.numel() for b in batches)),
                "observer": cfg.observer,
            }
        elif cfg.method == "qat":
            assert calib is not None
            extra["qat"] = train_qat(model, calib, base, cfg, spec, art.dir, seq_len)
        block = quantize(model, spec, scales)
        files = {n: checkpoint / n for n in TOKENIZER_FILES if (checkpoint / n).exists()}
        try:
            save_checkpoint(art.dir, model, files)
        except ValueError as e:
            raise UsageError(str(e)) from None
        info("quantize: measuring the quantized model")
        after = measure(model, ids, tok, seq_len, cfg, dtype, special)
        size_before = base.files[WEIGHTS_FILE]["bytes"]
        size_after = (art.dir / WEIGHTS_FILE).stat().st_size
        report = {
            "method": block["method"] if cfg.method != "qat" else f"qat → {block['method']}",
            "eval_data": eval_source,
            "eval_tokens": None if ids is None else len(ids),
            "eval_seq_len": seq_len,
            "decode_dtype": dtype_name,
            "decode_threads": torch.get_num_threads(),
            "before": {"file_bytes": size_before, **before},
            "after": {"file_bytes": size_after, **after},
            "size_ratio": size_after / size_before,
        }
        if before["bits_per_byte"] and after["bits_per_byte"]:
            report["bpb_change"] = after["bits_per_byte"] / before["bits_per_byte"] - 1
        if before["decode_tokens_per_s"] and after["decode_tokens_per_s"]:
            report["speedup"] = after["decode_tokens_per_s"] / before["decode_tokens_per_s"]
        art.stats.update(
            {
                "report": report,
                "quantized": quantized_modules(model),
                "groups_changed": layer_groups(model, cfg.group_size),
                **extra,
            }
        )
    print_report(out, art.stats)
    return art.stats


def report_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The before → after table as (row, text) pairs."""
    b, a = report["before"], report["after"]

    def pair(key: str, fmt: str, none: str) -> str:
        x, y = b[key], a[key]
        if x is None or y is None:
            return none
        return f"{format(x, fmt)} → {format(y, fmt)}"

    bpb = pair("bits_per_byte", ".4f", "no eval data")
    if "bpb_change" in report:
        bpb += f" ({report['bpb_change']:+.2%})"
    speed = pair("decode_tokens_per_s", ",.1f", "not measured")
    if "speedup" in report:
        speed += f" ({report['speedup']:.2f}×)"
    return [
        ("method", report["method"]),
        (
            "file size",
            f"{human_bytes(b['file_bytes'])} → {human_bytes(a['file_bytes'])} "
            f"({report['size_ratio']:.3f}×)",
        ),
        ("val loss", pair("val_loss", ".4f", "no eval data")),
        ("bits per byte", bpb),
        ("eval data", report["eval_data"]),
        (f"decode tok/s (CPU, batch 1, {report['decode_dtype']})", speed),
    ]


def print_report(out: Path, stats: dict[str, Any]) -> None:
    rows = report_rows(stats["report"])
    groups = stats.get("groups_changed") or {}
    if groups:
        rows.append(("int4 groups changed", "; ".join(f"{k}: {v}" for k, v in groups.items())))
    kinds: dict[str, int] = {}
    for r in stats["quantized"]:
        key = f"{r['kind']} {r['how']}"
        kinds[key] = kinds.get(key, 0) + 1
    rows.append(("quantized", "; ".join(f"{n} × {k}" for k, n in kinds.items())))
    summary(f"quantize → {out}", rows, columns=("", "base → quantized"))
