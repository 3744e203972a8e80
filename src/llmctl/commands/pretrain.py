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

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llmctl.artifacts import building, open_artifact, partial_dir
from llmctl.config import helpful, nested, to_dict
from llmctl.errors import UsageError
from llmctl.runtime import human_bytes, info, seed_everything, summary, warn

# Settings that change how often things are written or shown, never the numbers: a resumed
# run may change them.
COSMETIC = ("log_every", "save_every", "eval_every", "eval_batches")


@dataclass(frozen=True)
class DistributedConfig:
    """How several processes (under torchrun) share the work."""

    strategy: Literal["ddp", "fsdp"] = helpful(
        "ddp", "ddp: full replicas; fsdp: FSDP2 shards parameters, gradients, optimizer state"
    )


@dataclass(frozen=True)
class PretrainConfig:
    """Settings of `llmctl pretrain`."""

    preset: str = helpful("small", "model preset: tiny, small, gpt2-124m, llama-style")
    model: dict[str, Any] = helpful(
        {},
        "overrides of the preset's fields, e.g. model.n_layer=4, model.pos='alibi' "
        "(vocab_size comes from the tokenizer)",
    )
    objective: Literal["causal", "mlm"] = helpful(
        "causal", "causal: next-token LM; mlm: BERT masked LM (makes the model bidirectional)"
    )
    steps: int = helpful(1000, "optimizer steps")
    batch_size: int = helpful(16, "sequences per micro-batch (per process)")
    grad_accum: int = helpful(1, "micro-batches per optimizer step")
    seq_len: int = helpful(0, "tokens per sequence (0 = the model's max_seq_len)")
    lr: float = helpful(1e-3, "peak learning rate")
    min_lr_ratio: float = helpful(0.1, "cosine decay ends at lr * min_lr_ratio")
    warmup: int = helpful(100, "linear warmup steps")
    weight_decay: float = helpful(0.1, "AdamW weight decay (matrices only)")
    betas: list[float] = helpful([0.9, 0.95], "AdamW betas")
    clip: float = helpful(1.0, "max global gradient norm (0 = no clipping)")
    seed: int = helpful(0, "seed of initialization, data order and masks")
    device: Literal["auto", "cpu", "cuda"] = helpful("auto", "auto: CUDA when available")
    dtype: Literal["auto", "float32", "bfloat16"] = helpful(
        "auto", "auto: bf16 autocast on CUDA, fp32 on CPU (weights stay fp32)"
    )
    compile: bool = helpful(False, "torch.compile the model")
    activation_checkpointing: bool = helpful(False, "recompute blocks in backward (less memory)")
    eval_every: int = helpful(100, "validation every N steps (0 = only at the end)")
    eval_batches: int = helpful(20, "validation batches per evaluation")
    save_every: int = helpful(100, "save resumable state every N steps (0 = only at the end)")
    log_every: int = helpful(10, "metrics.jsonl line and progress update every N steps")
    distributed: DistributedConfig = nested(DistributedConfig, "multi-process training")

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {self.betas}")
        if self.batch_size < 1 or self.seq_len < 0 or self.eval_batches < 1:
            raise ValueError("batch_size and eval_batches must be >= 1, seq_len >= 0")


def build_model_config(cfg: PretrainConfig, vocab_size: int) -> Any:
    """The GPTConfig: preset < `model.*` overrides; vocab from the tokenizer; mlm → bidirectional
    unless `model.causal` is given (and then the objective refuses a causal model)."""
    from llmctl.model.gpt import PRESETS, preset

    if cfg.preset not in PRESETS:
        raise UsageError(f"config key 'preset': {cfg.preset!r} is not one of {', '.join(PRESETS)}")
    if "vocab_size" in cfg.model:
        raise UsageError("config key 'model.vocab_size': set by the tokenizer, not configurable")
    overrides = dict(cfg.model)
    if cfg.objective == "mlm":
        overrides.setdefault("causal", False)
    try:
        return preset(cfg.preset, **overrides, vocab_size=vocab_size)
    except (TypeError, ValueError) as e:
        raise UsageError(f"config key 'model': {e}") from e


def run(tokens_dir: Path, out: Path, cfg: PretrainConfig, force: bool = False) -> dict[str, Any]:
    """Train on `tokens_dir` and publish a checkpoint at `out`; returns the manifest stats."""
    from llmctl.data.tokens import TokenStream
    from llmctl.model.gpt import GPT
    from llmctl.model.io import save_checkpoint
    from llmctl.tokenizer import EOS_ID, MASK_ID, SPECIAL_TOKENS, load_tokenizer
    from llmctl.train import distributed
    from llmctl.train.batches import StepBatches
    from llmctl.train.loop import TrainConfig, Writer, train
    from llmctl.train.objectives import MaskedLM, NextToken

    world = distributed.init(cfg.device)
    tokens = open_artifact(tokens_dir, "tokens")
    tok = load_tokenizer(tokens_dir)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    mcfg = build_model_config(cfg, vocab)
    seq_len = cfg.seq_len or mcfg.max_seq_len
    if seq_len > mcfg.max_seq_len:
        raise UsageError(f"config key 'seq_len': {seq_len} > the model's max_seq_len")
    objective = (
        NextToken()
        if cfg.objective == "causal"
        else MaskedLM(MASK_ID, vocab, special_ids=range(len(SPECIAL_TOKENS)))
    )
    span = seq_len + objective.extra_tokens - 1  # TokenStream windows are span + 1 tokens

    def stream(split: str, batch_size: int) -> TokenStream:
        return TokenStream(tokens.path, split, batch_size, span, cfg.seed, verify=False)

    train_stream = stream("train", cfg.batch_size)
    if train_stream.vocab_size > vocab or train_stream.eos_id != EOS_ID:
        raise UsageError(f"{tokens.path}: shards do not match its tokenizer.json")
    try:
        val_stream = stream("val", cfg.batch_size)
        val = lambda: (  # noqa: E731
            {"tokens": torch.from_numpy(x)} for x in val_stream.sequential(cfg.eval_batches)
        )
    except UsageError as e:
        warn(f"no validation: {e}")
        val = None

    seed_everything(cfg.seed)
    model = GPT(mcfg).to(world.device)
    tcfg = TrainConfig(
        steps=cfg.steps,
        grad_accum=cfg.grad_accum,
        lr=cfg.lr,
        min_lr_ratio=cfg.min_lr_ratio,
        warmup=cfg.warmup,
        weight_decay=cfg.weight_decay,
        betas=(cfg.betas[0], cfg.betas[1]),
        clip=cfg.clip,
        seed=cfg.seed,
        precision=cfg.dtype,
        compile=cfg.compile,
        activation_checkpointing=cfg.activation_checkpointing,
        strategy=cfg.distributed.strategy,
        eval_every=cfg.eval_every,
        save_every=cfg.save_every,
        log_every=cfg.log_every,
        flops_per_token=model.flops_per_token(seq_len),
    )
    batches = StepBatches(
        train_stream.sample, accum=cfg.grad_accum, rank=world.rank, world=world.size
    )
    settings = {k: v for k, v in to_dict(cfg).items() if k not in COSMETIC}
    fingerprint = {"config": settings, "tokens": tokens.digest}
    if world.main:
        n = model.num_params(non_embedding=False)
        info(f"pretrain: {cfg.preset} ({n / 1e6:.2f}M params), {cfg.objective}, "
             f"{world.size} × {world.device}, {cfg.steps:,} steps × "
             f"{cfg.batch_size * cfg.grad_accum * world.size * seq_len:,} tokens")  # fmt: skip

    if not world.main:  # ranks > 0 only read the state rank 0 writes
        distributed.barrier()
        writer = Writer(partial_dir(out), fingerprint, main=False)
        train(model, batches, objective, tcfg, writer, val=val)
        _full_state(model, world)
        distributed.shutdown()
        return {}
    with building(
        out,
        kind="checkpoint",
        command="pretrain",
        config=to_dict(cfg),
        inputs={"tokens": tokens.path},
        force=force,
        resume=True,
    ) as art:
        distributed.barrier()
        writer = Writer(art.dir, fingerprint)
        result = train(model, batches, objective, tcfg, writer, val=val)
        final = _full_state(model, world)
        extra = {name: tokens.path / name for name in ("tokenizer.json", "tokenizer_config.json")}
        save_checkpoint(art.dir, final, extra)
        art.stats.update(
            {
                **dataclasses.asdict(result),
                "params": model.num_params(non_embedding=False),
                "params_non_embedding": model.num_params(),
                "seq_len": seq_len,
                "tokens_per_step": cfg.batch_size * cfg.grad_accum * world.size * seq_len,
                "world_size": world.size,
                "device": _device_name(world.device),
                "epochs": round(train_stream.epoch_of(cfg.steps * cfg.grad_accum * world.size), 4),
            }
        )
    distributed.shutdown()
    _summary(out, art.stats)
    return art.stats


def _full_state(model: torch.nn.Module, world: Any) -> Any:
    """A plain CPU GPT with the trained weights (gathers FSDP shards; every rank calls it)."""
    if world.size == 1:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from llmctl.model.gpt import GPT

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not world.main:
        return None
    with torch.device("meta"):
        copy = GPT(model.config)
    copy.load_state_dict(full, assign=True)
    if copy.config.tie_embeddings:
        copy.lm_head.weight = copy.tok_emb.weight
    return copy


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


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
