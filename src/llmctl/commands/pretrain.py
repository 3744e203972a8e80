"""`llmctl pretrain`: train a model from scratch on a `tokens` artifact; write a `checkpoint`.

The checkpoint holds `model.safetensors`, `config.json`, the tokenizer files and
`metrics.jsonl`; the manifest's stats hold the final losses, tokens seen, throughput and MFU.
Training state is kept inside the in-progress directory (`.OUT.partial/_state/`), so rerunning
the same command after a crash, kill or Ctrl-C continues exactly where the last save was.
Under `torchrun --nproc-per-node N` the same command trains data-parallel (DDP or FSDP2).

Example:
    llmctl pretrain out/tokens --out out/ckpt --preset small --steps 2000
    llmctl pretrain out/tokens --out out/mlm --preset tiny --objective mlm
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llmctl.artifacts import open_artifact
from llmctl.config import helpful, to_dict
from llmctl.errors import UsageError
from llmctl.runtime import human_bytes, info, seed_everything, summary
from llmctl.train.settings import COSMETIC, TrainSettings


@dataclass(frozen=True)
class PretrainConfig(TrainSettings):
    """Settings of `llmctl pretrain`: the shared training keys plus the model to build."""

    preset: str = helpful(
        "small",
        "model preset: tiny, mini, small, gpt2-124m, llama-style (GPT); rwkv-tiny, rwkv-small",
    )
    model: dict[str, Any] = helpful(
        {},
        "overrides of the preset's fields, e.g. model.n_layer=4, model.pos='alibi' "
        "(vocab_size comes from the tokenizer); model.arch='rwkv' picks RWKV-4 "
        "(preset small → rwkv-small)",
    )
    objective: Literal["causal", "mlm"] = helpful(
        "causal", "causal: next-token LM; mlm: BERT masked LM (makes the model bidirectional)"
    )
    init: str = helpful(
        "",
        "checkpoint to continue pretraining (its architecture replaces preset/model; the "
        "tokens must be made with its tokenizer: `tokenize --tokenizer CHECKPOINT`)",
    )


def run(tokens_dir: Path, out: Path, cfg: PretrainConfig, force: bool = False) -> dict[str, Any]:
    """Train on `tokens_dir` and publish a checkpoint at `out`; returns the manifest stats."""
    from llmctl.model.io import build_model, model_config, save_checkpoint
    from llmctl.tokenizer import load_specials, load_tokenizer
    from llmctl.train import distributed
    from llmctl.train.batches import StepBatches, token_streams
    from llmctl.train.objectives import MaskedLM, NextToken
    from llmctl.train.run import train_and_publish

    world = distributed.init(cfg.device)
    tokens = open_artifact(tokens_dir, "tokens")
    tok = load_tokenizer(tokens_dir)
    specials = load_specials(tokens_dir)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    init = _init_checkpoint(cfg, tokens) if cfg.init else None
    try:
        mcfg = init[0].config if init else model_config(cfg.preset, cfg.model, vocab,
                                                        masked=cfg.objective == "mlm")  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    seq_len = cfg.seq_len or mcfg.max_seq_len
    if seq_len > mcfg.max_seq_len:
        raise UsageError(f"config key 'seq_len': {seq_len} > the model's max_seq_len")
    if cfg.objective == "causal":
        objective: Any = NextToken()
    else:
        if specials.mask is None:
            raise UsageError(f"{tokens_dir}: the tokenizer has no mask token for masked LM")
        objective = MaskedLM(specials.mask, vocab, special_ids=specials.all)
    span = seq_len + objective.extra_tokens - 1  # TokenStream windows are span + 1 tokens

    train_stream, val = token_streams(
        tokens.path, batch_size=cfg.batch_size, span=span, seed=cfg.seed,
        eval_batches=cfg.eval_batches, eos_id=specials.eos, vocab_size=vocab,
        reader="its tokenizer.json",
    )  # fmt: skip

    seed_everything(cfg.seed)
    model = init[0].to(world.device) if init else build_model(mcfg).to(world.device)
    batches = StepBatches(
        train_stream.sample, accum=cfg.grad_accum, rank=world.rank, world=world.size
    )
    settings = {k: v for k, v in to_dict(cfg).items() if k not in COSMETIC}
    step_tokens = cfg.batch_size * cfg.grad_accum * world.size * seq_len
    if world.main:
        n = model.num_params(non_embedding=False)
        what = f"--init {cfg.init}" if init else cfg.preset
        info(f"pretrain: {type(model).__name__} {what} ({n / 1e6:.2f}M params), "
             f"{cfg.objective}, "
             f"{world.size} × {world.device}, {cfg.steps:,} steps × {step_tokens:,} "
             "tokens")  # fmt: skip
    tokenizer_files = {n: tokens.path / n for n in ("tokenizer.json", "tokenizer_config.json")}
    stats = train_and_publish(
        out,
        world=world,
        model=model,
        batches=batches,
        objective=objective,
        cfg=cfg,
        fingerprint={
            "config": settings,
            "tokens": tokens.digest,
            **({"init": init[1]} if init else {}),
        },
        command="pretrain",
        config=to_dict(cfg),
        inputs={"tokens": tokens.path, **({"init": Path(cfg.init)} if init else {})},
        save=lambda dir, final: save_checkpoint(dir, final, tokenizer_files),
        stats=lambda result: {
            "params": model.num_params(non_embedding=False),
            "params_non_embedding": model.num_params(),
            "seq_len": seq_len,
            "tokens_per_step": step_tokens,
            "epochs": round(train_stream.epoch_of(cfg.steps * cfg.grad_accum * world.size), 4),
        },
        val=val,
        flops_per_token=model.flops_per_token(seq_len),
        force=force,
    )
    if world.main:
        _summary(out, stats)
    return stats


def _init_checkpoint(cfg: PretrainConfig, tokens: Any) -> tuple[Any, str]:
    """(the fp32 model of `cfg.init`, its digest); refuses a checkpoint whose tokenizer is not
    the tokens artifact's, and preset/model settings that would be silently ignored."""
    from llmctl.model.io import load_model

    ckpt = open_artifact(cfg.init, "checkpoint")
    if cfg.model:
        raise UsageError("config key 'model': the architecture comes from --init, not model.*")
    theirs = ckpt.files.get("tokenizer.json", {}).get("sha256")
    ours = tokens.files.get("tokenizer.json", {}).get("sha256")
    if theirs is None or theirs != ours:
        raise UsageError(
            f"{tokens.path}: made with a different tokenizer than --init {ckpt.path}; "
            f"re-tokenize with `llmctl tokenize ... --tokenizer {ckpt.path}`"
        )
    model = load_model(ckpt.path, "cpu", torch.float32)
    if cfg.objective == "causal" and not model.config.causal:
        raise UsageError(f"{ckpt.path}: a masked-LM model; --objective causal needs a causal one")
    return model.train(), ckpt.digest


def _summary(out: Path, s: dict[str, Any]) -> None:
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    rows = [
        ("params", f"{s['params'] / 1e6:.2f}M ({s['params_non_embedding'] / 1e6:.2f}M non-emb.)"),
        ("steps", f"{s['steps']:,}" + (f" from {s['start_step']:,}" if s["start_step"] else "")),
        ("tokens seen", f"{s['tokens_seen']:,} ({s['epochs']} epochs)"),
        ("train loss", f(s["train_loss"], ".4f")),
        ("val loss", f(s["val_loss"], ".4f")),
        ("tokens/s", f(s["tokens_per_s"], ",.0f") + f" on {s['world_size']} × {s['device']}"),
        ("MFU", f(s["mfu"], ".1%")),
        ("checkpoint", f"{out} ({human_bytes(s['params'] * 4)} of fp32 weights)"),
    ]  # fmt: skip
    summary(f"pretrain → {out}", rows)
