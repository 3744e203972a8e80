"""`llmctl align`: preference optimization of a `checkpoint` (DPO, IPO, SimPO, ORPO, KTO) or a
Bradley–Terry reward model; writes a `checkpoint` (an `adapter` with `--lora`).

Reads preference files (`data/preferences.py`: prompt/chosen/rejected, hh-rlhf transcripts,
ShareGPT pairs, KTO labels), renders them with the checkpoint's chat template, holds out
`val_fraction` of the items and trains with the one loop (`train/preference.py` objectives).
The reference is the starting model: its log-probs of every item are computed once, before
the first step, and cached in the in-progress output (`_state/reference-<key>.safetensors`,
keyed by the checkpoint's digest and the tokenized data), so epochs and a resumed run reuse
them (`reference_cache=false` runs a frozen copy every step instead). SimPO and ORPO use no
reference. `--method reward` starts a `head = "score"` model from the checkpoint (the lm head
dropped, a new scalar head) and trains it on the same pairs.

Every evaluation (and step 0: the base) logs held-out preference accuracy, the implicit
reward accuracy and margin, chosen/rejected log-probs and the per-token KL to the reference
(`val_kl`, a probe over `kl_pairs` held-out chosen answers); the final figures are the
manifest's `stats["preference"]`. Resume, NaN stop and DDP come from the loop.

Example:
    llmctl align out/sft recipes/data/pairs --out out/dpo --method dpo --set beta=0.1
    llmctl align out/sft pairs.jsonl --out out/rm --method reward
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llmctl.artifacts import open_artifact, partial_dir
from llmctl.config import helpful, nested, to_dict
from llmctl.data.preferences import PreferenceDataConfig
from llmctl.errors import UsageError
from llmctl.runtime import info, seed_everything, summary, warn
from llmctl.train.rlaif import PairSettings
from llmctl.train.settings import COSMETIC, TrainSettings, check_steps_or_epochs

METHODS = ("dpo", "ipo", "simpo", "orpo", "kto", "reward")


@dataclass(frozen=True)
class AlignConfig(TrainSettings, PreferenceDataConfig):
    """Settings of `llmctl align`: the shared training keys, the data keys, the method's."""

    method: Literal["dpo", "ipo", "simpo", "orpo", "kto", "reward"] = helpful(
        "dpo", "dpo, ipo, simpo, orpo, kto (preference) or reward (a Bradley–Terry scorer)"
    )
    steps: int = helpful(0, "optimizer steps (0 = as many as `epochs` passes over the pairs)")
    epochs: float = helpful(1.0, "passes over the training pairs, when steps = 0")
    batch_size: int = helpful(8, "pairs (or KTO items) per micro-batch, per process")
    lr: float = helpful(1e-5, "peak learning rate")
    warmup: int = helpful(10, "linear warmup steps")
    weight_decay: float = helpful(0.0, "AdamW weight decay (matrices only)")
    eval_every: int = helpful(50, "evaluation every N steps (0 = only before and at the end)")
    save_every: int = helpful(50, "save resumable state every N steps (0 = only at the end)")
    beta: float = helpful(0.1, "β: DPO/IPO/KTO strength of the KL leash; SimPO reward scale")
    label_smoothing: float = helpful(0.0, "cDPO/SimPO: probability ε that a label is flipped")
    simpo_gamma: float = helpful(0.5, "SimPO target reward margin γ")
    orpo_lambda: float = helpful(0.1, "ORPO weight λ of the odds-ratio term beside the NLL")
    kto_desirable_weight: float = helpful(1.0, "KTO weight of desirable items")
    kto_undesirable_weight: float = helpful(1.0, "KTO weight of undesirable items")
    eval_pairs: int = helpful(0, "held-out items scored per evaluation (0 = all)")
    kl_pairs: int = helpful(
        64, "held-out chosen answers the KL-to-reference probe reads (0 = none)"
    )
    reference_cache: bool = helpful(
        True, "compute the reference log-probs once and cache them (false: every step)"
    )
    lora: bool = helpful(False, "train LoRA adapters on the frozen checkpoint (writes an adapter)")
    lora_rank: int = helpful(8, "LoRA rank (with lora = true)")
    lora_alpha: float = helpful(16.0, "LoRA alpha: the update is scaled by alpha / rank")
    lora_dropout: float = helpful(0.0, "dropout on the LoRA input")
    lora_targets: list[str] = helpful(["attn"], "layers to adapt (as `lora --targets`)")

    def __post_init__(self) -> None:
        check_steps_or_epochs(self, self.epochs)  # steps = 0 means "from epochs"
        PreferenceDataConfig.__post_init__(self)
        if self.method not in METHODS:
            raise UsageError(
                f"config key 'method': one of {', '.join(METHODS)}, not {self.method!r}"
            )
        if self.beta <= 0:
            raise UsageError(f"config key 'beta': must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise UsageError("config key 'label_smoothing': must be in [0, 0.5)")
        for k in ("orpo_lambda", "kto_desirable_weight", "kto_undesirable_weight",
                  "eval_pairs", "kl_pairs"):  # fmt: skip
            if getattr(self, k) < 0:
                raise UsageError(f"config key '{k}': must be >= 0, got {getattr(self, k)}")
        if self.lora and self.method == "reward":
            raise UsageError("--lora with --method reward: the new score head must train in full")
        if self.lora_rank < 1:
            raise UsageError(f"config key 'lora_rank': must be >= 1, got {self.lora_rank}")


@dataclass(frozen=True)
class RlaifConfig(AlignConfig):
    """Settings of `llmctl align --method rlaif`: how the pairs are sampled and judged
    (`rlaif.*`), then the preference training on them (`method`, DPO by default)."""

    rlaif: PairSettings = nested(PairSettings, "sampling and judging the candidate answers")


def run(checkpoint: Path, data: list[Path], out: Path, cfg: AlignConfig,
        force: bool = False) -> dict[str, Any]:  # fmt: skip
    """Align `checkpoint` on the preference files `data`; publish at `out`; returns stats."""
    return train_preference(checkpoint, data, out, cfg, force=force)


def run_rlaif(checkpoint: Path, prompts: list[Path], out: Path, judge: str, cfg: RlaifConfig,
              force: bool = False) -> dict[str, Any]:  # fmt: skip
    """RLAIF: sample `cfg.rlaif.k` answers per prompt from `checkpoint`, rank them with
    `judge` (a reward-model checkpoint or `judge:LM`), train `cfg.method` (DPO) on the
    best-vs-worst pairs; the artifact holds them as `pairs.jsonl` (valid DATA for dpo).

    Example: run_rlaif(Path("out/sft"), [Path("prompts.jsonl")], Path("out/rlaif"),
                       "out/rm", RlaifConfig(steps=20))"""
    from llmctl.train import distributed
    from llmctl.train.rlaif import make_pairs, pairs_jsonl

    if Path(out).exists() and not force:
        raise UsageError(f"{out}: already exists; use --force to replace it")
    world = distributed.init(cfg.device)
    skipped: list[Any] = []
    pairs, got = make_pairs(checkpoint, prompts, judge, cfg.rlaif, device=world.device,
                            rejected=skipped)  # fmt: skip
    if not pairs:
        raise UsageError(f"RLAIF: the judge {judge} told no answers apart ({got['prompts']} "
                         f"prompts, {got['ties']} ties): no pairs to train on")  # fmt: skip
    if world.main:
        info(f"rlaif: {got['pairs']} pairs from {got['prompts']} prompts x {cfg.rlaif.k} answers "
             f"({got['ties']} ties dropped), judged by {judge}")  # fmt: skip
    return train_preference(
        checkpoint, pairs, out, cfg, force=force,
        extra_files={"pairs.jsonl": pairs_jsonl(pairs)},
        extra_stats={"rlaif": {**got, "judge": judge}},
        extra_inputs={f"input-{i}": p for i, p in enumerate(prompts)},
        extra_rejected=skipped,
    )  # fmt: skip


def train_preference(
    checkpoint: Path,
    data: list[Path] | list[dict[str, Any]],
    out: Path,
    cfg: AlignConfig,
    *,
    force: bool = False,
    extra_files: dict[str, bytes] | None = None,
    extra_stats: dict[str, Any] | None = None,
    extra_inputs: dict[str, Path] | None = None,
    extra_rejected: list[Any] | None = None,
) -> dict[str, Any]:
    """Train on preference files, or on in-memory records (dicts of any accepted shape, e.g.
    `{"prompt", "chosen", "rejected"}` pairs generated by RLAIF), and publish `out`.
    `extra_files` (name -> bytes) are written into the artifact too (e.g. `pairs.jsonl`),
    `extra_stats` join its stats, `extra_inputs` its inputs, `extra_rejected` (records an
    earlier step skipped) its `rejected/errors.jsonl`.
    Returns the manifest stats (empty on ranks > 0)."""
    from llmctl.data.chats import data_digest, write_rejected
    from llmctl.data.preferences import PairRows, items_digest, load_preferences, split_items
    from llmctl.model.io import load_model
    from llmctl.tokenizer import (
        CHAT_TEMPLATE,
        chat_template_of,
        check_fits,
        load_specials,
        load_tokenizer,
        tokenizer_config_with_template,
    )
    from llmctl.train import distributed
    from llmctl.train.batches import StepBatches, as_tensors
    from llmctl.train.loop import first_evaluation
    from llmctl.train.reference import (
        cached_reference_logps,
        reference_context,
        reference_fn,
        score_model,
    )
    from llmctl.train.run import train_and_publish

    ckpt = open_artifact(checkpoint, "checkpoint")
    if Path(out).exists() and not force:
        raise UsageError(f"{out}: already exists; use --force to replace it")
    tok, specials = load_tokenizer(checkpoint), load_specials(checkpoint)
    model = load_model(checkpoint)
    mcfg = model.config
    check_fits(tok, mcfg.vocab_size, str(checkpoint))
    if not getattr(mcfg, "causal", True) or getattr(mcfg, "head", "lm") != "lm":
        raise UsageError(f"{checkpoint}: align starts from a causal language model "
                         "(not a masked-LM or a reward model)")  # fmt: skip
    if cfg.method == "reward" and not hasattr(mcfg, "head"):
        raise UsageError(f"{checkpoint}: {type(model).__name__} has no score head (reward "
                         "models are transformers)")  # fmt: skip
    seq_len = cfg.seq_len or mcfg.max_seq_len
    if seq_len > mcfg.max_seq_len:
        raise UsageError(f"config key 'seq_len': {seq_len} > the model's max_seq_len "
                         f"{mcfg.max_seq_len}")  # fmt: skip
    base_template = chat_template_of(checkpoint)
    template = base_template or CHAT_TEMPLATE
    # Rows are right-padded: a causal model never attends to the padding of a real token.
    loaded = load_preferences(data, tok, template=template, end_id=specials.end_of_turn,
                              ctx=seq_len + (cfg.method != "reward"), opts=cfg,
                              kto=cfg.method == "kto")  # fmt: skip
    # (a reward model reads whole rows: seq_len tokens; the others predict T of T + 1)
    items, s = loaded.items, loaded.stats
    train_idx, val_idx = split_items(items, cfg.val_fraction)
    kw = dict(batch_size=cfg.batch_size, seed=cfg.seed, pad_id=specials.pad_or_eos)
    rows = PairRows(items, train_idx, **kw)  # type: ignore[arg-type]
    val_rows = PairRows(items, val_idx, **kw, shuffle=False) if val_idx else None  # type: ignore[arg-type]
    world = distributed.init(cfg.device)
    per_step = cfg.batch_size * cfg.grad_accum * world.size
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(train_idx) / per_step))
    tcfg = dataclasses.replace(cfg, steps=steps)
    if val_rows is None and world.main:
        warn("no evaluation: too few items to hold any out (val_fraction)")

    files = [Path(f) for f in s["files"]] if s["files"] and "memory" not in s["files"] else []
    digest = (
        data_digest(files)
        if files
        else [hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()]
    )
    base_dtype = next(model.parameters()).dtype
    model = model.float()
    if cfg.method == "reward":
        model = score_model(model, cfg.seed)
    model = model.to(world.device)
    objective = _objective(cfg)
    ref_state, ref_seconds = "none", 0.0
    cache: torch.Tensor | None = None
    if objective.needs_reference:
        key = hashlib.sha256(json.dumps([ckpt.digest, items_digest(items), cfg.dtype],
                                        sort_keys=True).encode()).hexdigest()  # fmt: skip
        if cfg.reference_cache:
            path = partial_dir(out) / "_state" / f"reference-{key[:16]}.safetensors"
            cache, ref_state, ref_seconds = cached_reference_logps(
                model, items, path, key, batch_size=cfg.batch_size, precision=cfg.dtype,
                device=world.device, main=world.main,
            )  # fmt: skip
        else:
            ref_state = "every step"
    adapted: list[str] = []
    if cfg.lora:
        from llmctl.model.lora import apply_lora

        seed_everything(cfg.seed)
        try:
            adapted = apply_lora(model, cfg.lora_targets, cfg.lora_rank, cfg.lora_alpha,
                                 cfg.lora_dropout)  # fmt: skip
        except ValueError as e:
            raise UsageError(f"config key 'lora_targets': {e}") from None
    # the reference model runs every step (uncached) and/or in the KL probe; a reward model has none
    every_step = objective.needs_reference and cache is None
    reference = None
    if cfg.method != "reward" and (every_step or cfg.kl_pairs):
        reference = reference_context(model, cfg.lora)
    if reference is not None and hasattr(objective, "reference"):
        objective.reference = reference_fn(reference)

    def with_ref(b: dict[str, Any]) -> dict[str, Any]:
        if cache is not None:
            idx = b["index"]
            b["ref"] = torch.cat([cache[idx, 0], cache[idx, 1]]).numpy()
        return b

    batches = StepBatches(lambda i: with_ref(rows.sample(i)), accum=cfg.grad_accum,
                          rank=world.rank, world=world.size)  # fmt: skip
    val = None
    if val_rows is not None:
        vr = val_rows
        val = lambda: (as_tensors(with_ref(b)) for b in vr.sequential(cfg.eval_pairs))  # noqa: E731
    probes = []
    if val_rows is not None and cfg.kl_pairs and cfg.method != "reward":
        from llmctl.train.preference import kl_probe

        vr2 = val_rows
        probe_batches = lambda: (as_tensors(b) for b in vr2.sequential(cfg.kl_pairs))  # noqa: E731
        probes.append(kl_probe(model, probe_batches, reference))  # type: ignore[arg-type]

    settings = {k: v for k, v in to_dict(cfg).items() if k not in COSMETIC}
    fingerprint = {"config": settings, "checkpoint": ckpt.digest, "data": digest}
    if world.main:
        n = sum(p.numel() for p in model.parameters())
        t = sum(p.numel() for p in model.parameters() if p.requires_grad)
        info(f"align --method {cfg.method}: {checkpoint} ({n / 1e6:.2f}M params, {t / 1e6:.2f}M "
             f"train), {s['pairs']:,} items ({len(train_idx):,} train, {len(val_idx):,} "
             f"held out), {steps:,} steps; reference: {ref_state}")  # fmt: skip
    # the template trained with travels with the output (the base's own stays as it is)
    tokenizer_config = tokenizer_config_with_template(
        checkpoint, None if base_template else template
    )

    def save(dir: Path, final: torch.nn.Module) -> None:
        if cfg.lora:
            from llmctl.model.adapter import save_adapter

            try:
                save_adapter(dir, final, base_digest=ckpt.digest, base_path=str(ckpt.path),
                             dropout=cfg.lora_dropout)  # fmt: skip
            except ValueError as e:
                raise UsageError(f"{out}: {e}") from None
            if tokenizer_config is not None and base_template is None:
                (dir / "tokenizer_config.json").write_bytes(tokenizer_config)
        else:
            from llmctl.model.io import save_checkpoint

            extra: dict[str, Path | bytes] = {"tokenizer.json": checkpoint / "tokenizer.json"}
            if tokenizer_config is not None:
                extra["tokenizer_config.json"] = tokenizer_config
            save_checkpoint(dir, final.to(base_dtype), extra)
        write_rejected(dir, [*(extra_rejected or []), *loaded.rejected])
        for name, content in (extra_files or {}).items():
            (dir / name).write_bytes(content)

    def stats(result: Any) -> dict[str, Any]:
        v = result.val_metrics
        base = first_evaluation(partial_dir(out) / "metrics.jsonl")
        pref = {
            "method": cfg.method,
            "accuracy": v.get("val_accuracy"),
            "base_accuracy": base.get("val_accuracy"),
            "reward_accuracy": v.get("val_reward_accuracy"),
            "margin": v.get("val_margin"),
            "chosen_logp": v.get("val_chosen_logp"),
            "rejected_logp": v.get("val_rejected_logp"),
            "base_chosen_logp": base.get("val_chosen_logp"),
            "base_rejected_logp": base.get("val_rejected_logp"),
            "kl": v.get("val_kl"),
            "pairs": s["pairs"],
            "pairs_train": len(train_idx),
            "pairs_val": len(val_idx),
            "cut": s["cut"],
            "rejected": s["rejected_total"],
        }
        return {
            "preference": pref,
            "reference": ref_state,
            "reference_s": round(ref_seconds, 3),
            "seq_len": seq_len,
            "records": s["records"],
            "rejected_reasons": s["rejected"],
            "data_files": s["files"],
            "epochs": round(rows.epoch_of(steps * cfg.grad_accum * world.size), 4),
            # every parameter of the published model (aux heads are dropped on save)
            "params": sum(
                p.numel()
                for n, p in model.named_parameters()
                if not n.startswith("aux.") and "lora_" not in n
            ),
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "adapted_layers": len(adapted),
            "chat_template": "base" if base_template else "llmctl default",
            **(extra_stats or {}),
        }

    inputs: dict[str, Path] = {"checkpoint": checkpoint}
    inputs |= {f"input-{i}": f for i, f in enumerate(files)} | (extra_inputs or {})
    rebuild = None
    if cfg.lora:
        from llmctl.model.io import build_model
        from llmctl.model.lora import describe_lora

        block = describe_lora(model)
        rebuild = lambda: build_model(mcfg, {"lora": block})  # noqa: E731
    result = train_and_publish(
        out, world=world, model=model, batches=batches, objective=objective, cfg=tcfg,
        fingerprint=fingerprint, command="align", kind="adapter" if cfg.lora else "checkpoint",
        config=to_dict(cfg), inputs=inputs, save=save, stats=stats, val=val, probes=probes,
        rebuild=rebuild, eval_first=True, force=force,
    )  # fmt: skip
    if world.main:
        _summary(out, result)
    return result


def _objective(cfg: AlignConfig) -> Any:
    from llmctl.train.preference import KTOObjective, PairObjective, RewardObjective

    if cfg.method == "reward":
        return RewardObjective()
    if cfg.method == "kto":
        return KTOObjective(beta=cfg.beta, desirable_weight=cfg.kto_desirable_weight,
                            undesirable_weight=cfg.kto_undesirable_weight)  # fmt: skip
    return PairObjective(cfg.method, beta=cfg.beta, label_smoothing=cfg.label_smoothing,
                         simpo_gamma=cfg.simpo_gamma, orpo_lambda=cfg.orpo_lambda)  # fmt: skip


def _summary(out: Path, s: dict[str, Any]) -> None:
    p = s["preference"]

    def f(x: float | None, fmt: str = ".4f") -> str:
        return "-" if x is None else format(x, fmt)

    reasons = ", ".join(f"{k} {v}" for k, v in s["rejected_reasons"].items())
    rows = [
        ("method", p["method"]),
        ("items", f"{p['pairs']:,} ({p['pairs_train']:,} train, {p['pairs_val']:,} held out) "
                  f"of {s['records']:,} records; {p['cut']:,} cut to {s['seq_len']} tokens"),
        ("rejected", f"{p['rejected']:,}" + (f" ({reasons})" if reasons else "")),
        ("steps", f"{s['steps']:,}" + (f" from {s['start_step']:,}" if s["start_step"] else "")
                  + f" ({s['epochs']} epochs); reference: {s['reference']}"),
        ("accuracy", f"{f(p['base_accuracy'], '.3f')} (base) → {f(p['accuracy'], '.3f')} held out"),
        ("reward acc / margin", f"{f(p['reward_accuracy'], '.3f')} / {f(p['margin'])}"),
        ("chosen logp", f"{f(p['base_chosen_logp'], '.2f')} → {f(p['chosen_logp'], '.2f')}"),
        ("rejected logp", f"{f(p['base_rejected_logp'], '.2f')} → {f(p['rejected_logp'], '.2f')}"),
        ("KL to reference", f"{f(p['kl'])} nats/token"),
        ("train loss", f(s["train_loss"])),
        ("output", str(out)),
    ]  # fmt: skip
    summary(f"align → {out}", rows)
