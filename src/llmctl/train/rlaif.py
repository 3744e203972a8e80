"""RLAIF's pairs: k sampled answers per prompt, ranked by a judge, best vs worst kept.

One round before training (Bai et al. 2022; Lee et al. 2023): the policy samples `k` responses
per prompt (`train.rollout.complete`: generate's sampler and KV cache, new tokens capped at the
context), a judge (`train.rewards.Reward`: a reward-model checkpoint, or an LM judge
`judge:CHECKPOINT`) scores each, and the highest- and lowest-scored become one preference
pair `{"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}`. A prompt whose best
and worst scores tie (all answers judged equal, or identical texts) gives no pair and is
counted. The records are valid DATA for `align --method dpo` (the prompt as the source record
gave it: text or messages); `pairs_jsonl` is their `pairs.jsonl`.

Example:
    pairs, stats = make_pairs(Path("out/sft"), [Path("prompts.jsonl")], "judge:out/big",
                              PairSettings(k=4))
    (art.dir / "pairs.jsonl").write_bytes(pairs_jsonl(pairs))   # stats: {"prompts", "pairs", ...}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmctl.config import helpful
from llmctl.errors import UsageError
from llmctl.model.sample import GenerationParams, Stops
from llmctl.runtime import progress
from llmctl.train.rewards import Reward, Samples


@dataclass(frozen=True)
class PairSettings:
    """How RLAIF samples and ranks candidate answers."""

    k: int = helpful(4, "answers sampled per prompt (best and worst become a pair)")
    max_new_tokens: int = helpful(64, "most tokens per answer (capped by the context)")
    temperature: float = helpful(1.0, "sampling temperature of the candidates")
    top_k: int = helpful(0, "sample among the k most likely tokens (0: off)")
    top_p: float = helpful(1.0, "sample from this much probability (1: off)")
    seed: int = helpful(0, "sampling seed (answers depend only on it and the prompt's index)")
    batch: int = helpful(8, "prompts sampled together")
    chat: str = helpful("auto", "auto|yes|no: render prompts with the checkpoint's template")
    strict: bool = helpful(False, "fail at the first malformed prompt instead of skipping it")
    min_margin: float = helpful(0.0, "drop pairs whose score difference is not above this")

    def __post_init__(self) -> None:
        if self.k < 2:
            raise UsageError(f"config key 'k': RLAIF needs >= 2 answers per prompt, got {self.k}")
        if self.max_new_tokens < 1 or self.batch < 1 or self.temperature <= 0:
            raise UsageError("config keys: max_new_tokens, batch >= 1 and temperature > 0")


def rank_pairs(
    prompts: list[Any], answers: list[list[str]], scores: torch.Tensor, min_margin: float = 0.0
) -> tuple[list[dict[str, Any]], int]:
    """(best-vs-worst records, ties dropped). `scores` [P, k] for `answers` [P][k]; ties keep
    the first-sampled answer as the best and the last as the worst among equals."""
    pairs, ties = [], 0
    for p, texts, row in zip(prompts, answers, scores.tolist(), strict=True):
        best = max(range(len(row)), key=lambda i: (row[i], -i))
        worst = min(range(len(row)), key=lambda i: (row[i], -i))
        if row[best] - row[worst] <= min_margin or texts[best] == texts[worst]:
            ties += 1
            continue
        pairs.append({"prompt": p, "chosen": texts[best], "rejected": texts[worst],
                      "chosen_score": row[best], "rejected_score": row[worst]})  # fmt: skip
    return pairs, ties


def make_pairs(
    checkpoint: Path,
    prompts: list[Path],
    judge: str | Reward,
    cfg: PairSettings,
    *,
    device: Any = "cpu",
    rejected: list[Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample `cfg.k` answers per prompt of `prompts` from `checkpoint`, score them with
    `judge` (a spec for `load_reward`, or a Reward), keep best vs worst. Returns (pairs,
    stats: prompts, pairs, ties, capped, truncated prompts, rejected records); the skipped
    prompt records themselves are appended to `rejected` when given (`rejected/errors.jsonl`)."""
    from llmctl.data.prompts import load_prompts
    from llmctl.tokenizer import chat_template_of, decode, load_specials, load_tokenizer
    from llmctl.train.online_run import load_policy
    from llmctl.train.rewards import load_reward
    from llmctl.train.rollout import complete

    tok = load_tokenizer(checkpoint)
    specials = load_specials(checkpoint)
    policy = load_policy(checkpoint, device).eval()
    ctx = policy.config.max_seq_len
    template = chat_template_of(checkpoint)
    chat = None if cfg.chat == "auto" else cfg.chat == "yes"
    got = load_prompts(prompts, tok, template=template, chat=chat,
                       max_tokens=max(1, ctx - cfg.max_new_tokens), strict=cfg.strict)  # fmt: skip
    if rejected is not None:
        rejected.extend(got.rejected)
    scorer = judge if not isinstance(judge, str) else load_reward(
        judge, tokenizer_dir=checkpoint, device=device, pad_id=specials.pad_or_eos, what="--judge"
    )  # fmt: skip
    use_chat = template is not None if chat is None else chat
    stop_ids = frozenset({specials.end_of_turn}) if use_chat else frozenset()
    stops = Stops(cfg.max_new_tokens, eos_ids=frozenset({specials.eos}), stop_ids=stop_ids)
    params = GenerationParams(max_new_tokens=cfg.max_new_tokens, do_sample=True,
                              temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                              num_samples=cfg.k, seed=cfg.seed)  # fmt: skip
    answers: list[list[str]] = []
    all_scores = []
    capped = 0
    with progress("rlaif", total=len(got.ids), unit="it") as bar:
        for start in range(0, len(got.ids), cfg.batch):
            ids = got.ids[start : start + cfg.batch]
            done, rs = complete(policy, ids, params, stops=stops, pad_id=specials.pad_or_eos,
                                first_index=start)  # fmt: skip
            capped += rs.capped
            bodies = [stops.body(c) for comps in done for c in comps]
            texts = [decode(tok, b, skip_special_tokens=True) for b in bodies]
            rows = [list(ids[i // cfg.k])[-(ctx - 1) :] for i in range(len(bodies))]
            ptexts = [got.texts[start + i // cfg.k] for i in range(len(bodies))]
            scores = scorer(Samples(rows, bodies, ptexts, texts)).float().view(-1, cfg.k)
            answers += [texts[i : i + cfg.k] for i in range(0, len(texts), cfg.k)]
            all_scores.append(scores)
            bar.advance(len(ids))
    pairs, ties = rank_pairs(got.prompts, answers, torch.cat(all_scores), cfg.min_margin)
    stats = {"prompts": len(got.ids), "pairs": len(pairs), "ties": ties, "k": cfg.k,
             "capped": capped, "truncated_prompts": got.truncated,
             "rejected": got.stats["rejected"],
             "judge": judge if isinstance(judge, str) else scorer.name}  # fmt: skip
    return pairs, stats


def pairs_jsonl(pairs: list[dict[str, Any]]) -> bytes:
    """The content of `pairs.jsonl`: one record a line, UTF-8."""
    return "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in pairs).encode()
