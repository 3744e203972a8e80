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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmctl.config import helpful, nested
from llmctl.data.preferences import PreferenceDataConfig
from llmctl.errors import UsageError
from llmctl.runtime import info
from llmctl.train.rlaif import PairSettings
from llmctl.train.settings import TrainSettings, check_steps_or_epochs

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
    from llmctl.train.preference_run import train_preference

    return train_preference(checkpoint, data, out, cfg, force=force)


def run_rlaif(checkpoint: Path, prompts: list[Path], out: Path, judge: str, cfg: RlaifConfig,
              force: bool = False) -> dict[str, Any]:  # fmt: skip
    """RLAIF: sample `cfg.rlaif.k` answers per prompt from `checkpoint`, rank them with
    `judge` (a reward-model checkpoint or `judge:LM`), train `cfg.method` (DPO) on the
    best-vs-worst pairs; the artifact holds them as `pairs.jsonl` (valid DATA for dpo).

    Example: run_rlaif(Path("out/sft"), [Path("prompts.jsonl")], Path("out/rlaif"),
                       "out/rm", RlaifConfig(steps=20))"""
    from llmctl.train import distributed
    from llmctl.train.preference_run import train_preference
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
