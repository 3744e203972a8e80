"""Rewards for online RL and judges for RLAIF: a batch of (prompt, response) in, float32 [N] out.

A `Reward` is called with `Samples` (the prompts' and responses' token ids, in the policy's
tokenizer, and their texts) and returns one score per response. `load_reward(spec)` builds
one from a spec:

- `builtin:length[:TARGET]`: 1 - min(1, |n - TARGET| / TARGET) for a response of n tokens
  (TARGET 16 by default): a verifiable reward whose optimum the policy can only reach by
  learning when to stop;
- `builtin:keyword:WORD`: 1 when WORD appears in the response (case-insensitive), else 0;
- `builtin:distinct`: the share of distinct tokens in the response (penalizes loops);
- a reward-model checkpoint directory (`config.json` head = "score", trained by `align
  --method reward`): the [B, T, 1] score read at the last token of prompt + response; its
  tokenizer must be the policy's;
- `judge:CHECKPOINT`: a language model as judge (RLAIF), scoring a response by its mean
  log-likelihood after a rubric prompt; `judge-yes:CHECKPOINT` scores by the log-probability
  of " Yes" after a question asking whether the answer is good. A judge reads text, so its
  tokenizer may differ from the policy's.

Example:
    reward = load_reward("builtin:length:8", tokenizer_dir=ckpt, device="cpu")
    reward(Samples(prompt_ids, response_ids, prompt_texts, response_texts))  # tensor [N]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from llmctl.errors import UsageError

SPECS = "builtin:length[:TARGET], builtin:keyword:WORD, builtin:distinct, a reward-model " \
        "checkpoint, judge:CHECKPOINT or judge-yes:CHECKPOINT"  # fmt: skip
RUBRIC = ("Below is a question and an answer that is helpful, correct, clear and concise.\n\n"
          "Question: {prompt}\n\nAnswer: ")  # fmt: skip
VERDICT = ("Question: {prompt}\n\nAnswer: {response}\n\nIs this answer helpful, correct and "
           "concise? Reply Yes or No.\nVerdict:")  # fmt: skip


@dataclass
class Samples:
    """A batch of responses to score: ids in the policy's tokenizer, and texts."""

    prompt_ids: Sequence[Sequence[int]]
    response_ids: Sequence[Sequence[int]]
    prompt_texts: Sequence[str]
    response_texts: Sequence[str]


class Reward(Protocol):
    name: str

    def __call__(self, samples: Samples) -> torch.Tensor: ...


@dataclass
class LengthReward:
    target: int = 16
    name: str = "builtin:length"

    def __call__(self, samples: Samples) -> torch.Tensor:
        n = torch.tensor([len(r) for r in samples.response_ids], dtype=torch.float32)
        return 1.0 - ((n - self.target).abs() / self.target).clamp(max=1.0)


@dataclass
class KeywordReward:
    word: str
    name: str = "builtin:keyword"

    def __call__(self, samples: Samples) -> torch.Tensor:
        w = self.word.lower()
        return torch.tensor([float(w in t.lower()) for t in samples.response_texts])


@dataclass
class DistinctReward:
    name: str = "builtin:distinct"

    def __call__(self, samples: Samples) -> torch.Tensor:
        return torch.tensor(
            [len(set(r)) / len(r) if r else 0.0 for r in samples.response_ids],
            dtype=torch.float32,
        )


def _right_pad(rows: Sequence[Sequence[int]], pad: int, device: Any) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
    return out.to(device)


@dataclass
class RewardModel:
    """A `head="score"` checkpoint: the score at the last token of prompt + response + `end`
    (right padding, so the last real token's position is its length - 1). Sequences longer
    than the model's context keep their last tokens.

    `end` is what closes an answer in the rows `align --method reward` trained on (the chat
    template's end-of-turn token): a response body comes without its stop token, and a score
    read at the last word instead is read where the model was never trained to score."""

    model: nn.Module
    pad_id: int
    batch_size: int = 16
    name: str = "reward-model"
    end: tuple[int, ...] = ()

    @torch.no_grad()
    def __call__(self, samples: Samples) -> torch.Tensor:
        ctx = self.model.config.max_seq_len
        seqs = [[*p, *r, *self.end] for p, r in zip(samples.prompt_ids, samples.response_ids,
                                                     strict=True)]  # fmt: skip
        seqs = [s[-ctx:] for s in seqs]
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(seqs), self.batch_size):
            chunk = seqs[i : i + self.batch_size]
            scores = self.model(_right_pad(chunk, self.pad_id, device))  # [B, T, 1]
            last = torch.tensor([len(s) - 1 for s in chunk], device=device)
            out.append(scores[torch.arange(len(chunk), device=device), last, 0].float().cpu())
        return torch.cat(out)


@dataclass
class JudgeLM:
    """A language model as judge. `mode="loglik"`: the mean log-probability of the response's
    tokens after `RUBRIC` (a fluent, on-topic answer scores high); `mode="yes"`: the
    log-probability of " Yes" after `VERDICT`. Texts are re-encoded with the judge's
    tokenizer; the rubric prompt is cut from the left to fit the judge's context."""

    model: nn.Module
    tok: Any
    mode: str = "loglik"
    batch_size: int = 8
    name: str = "judge"

    def _encode(self, text: str) -> list[int]:
        from llmctl.tokenizer import encode

        return encode(self.tok, text)

    @torch.no_grad()
    def __call__(self, samples: Samples) -> torch.Tensor:
        ctx = self.model.config.max_seq_len
        rows: list[tuple[list[int], int]] = []  # (ids, first scored position)
        if self.mode == "yes":
            yes = self._encode(" Yes")[:1]
            for p, r in zip(samples.prompt_texts, samples.response_texts, strict=True):
                ids = self._encode(VERDICT.format(prompt=p, response=r))[-(ctx - 1) :] + yes
                rows.append((ids, len(ids) - 1))
        else:
            for p, r in zip(samples.prompt_texts, samples.response_texts, strict=True):
                resp = self._encode(r)[: ctx - 1] or self._encode(" ")
                head = self._encode(RUBRIC.format(prompt=p))[-(ctx - len(resp)) :]
                rows.append((head + resp, len(head)))
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(rows), self.batch_size):
            chunk = rows[i : i + self.batch_size]
            ids = _right_pad([r for r, _ in chunk], 0, device)
            logp = torch.log_softmax(self.model(ids[:, :-1]).float(), dim=-1)
            tok = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]: log p(ids[t+1])
            for b, (r, start) in enumerate(chunk):
                out.append(tok[b, start - 1 : len(r) - 1].mean().cpu())
        return torch.stack(out).float()


def _load_checkpoint(path: Path, device: Any) -> nn.Module:
    from llmctl.model.io import load_model

    return load_model(path, device=device).eval().requires_grad_(False)


def load_reward(
    spec: str, *, tokenizer_dir: Path, device: Any = "cpu", pad_id: int = 0, what: str = "--reward"
) -> Reward:
    """The reward `spec` names (see the module doc). `tokenizer_dir` is the policy's (a reward
    model must share it). UsageError, one line: an empty, unknown or malformed spec, a missing
    checkpoint, a language model given as reward model, a tokenizer mismatch."""
    if not spec:
        raise UsageError(f"{what}: missing; give one of {SPECS}")
    if spec.startswith("builtin:"):
        name, _, arg = spec.removeprefix("builtin:").partition(":")
        if name == "length":
            if arg and not (arg.isdigit() and int(arg) > 0):
                raise UsageError(f"{what} {spec}: the length target must be a positive integer")
            return LengthReward(int(arg) if arg else 16)
        if name == "keyword":
            if not arg.strip():
                raise UsageError(f"{what} {spec}: give the word, e.g. builtin:keyword:happy")
            return KeywordReward(arg)
        if name == "distinct" and not arg:
            return DistinctReward()
        raise UsageError(f"{what} {spec}: unknown builtin; give one of {SPECS}")
    mode = None
    for prefix, m in (("judge:", "loglik"), ("judge-yes:", "yes")):
        if spec.startswith(prefix):
            mode, spec = m, spec.removeprefix(prefix)
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise UsageError(f"{what} {spec}: not a checkpoint directory (no config.json) and not "
                         f"a builtin; give one of {SPECS}")  # fmt: skip
    from llmctl.model.io import load_config

    try:
        head = getattr(load_config(path), "head", "lm")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if mode is not None:
        if head != "lm":
            raise UsageError(f"{what} {spec}: a judge must be a language model; this is a "
                             f"reward model (head={head!r}): pass it without 'judge:'")  # fmt: skip
        from llmctl.tokenizer import load_specials, load_tokenizer

        load_specials(path)  # its tokenizer files are whole (one line naming the file if not)
        return JudgeLM(_load_checkpoint(path, device), load_tokenizer(path), mode)
    if head != "score":
        raise UsageError(f"{what} {spec}: not a reward model (config head={head!r}, expected "
                         f"'score'); train one with align --method reward, or use it as a "
                         f"judge: judge:{spec}")  # fmt: skip
    from llmctl.tokenizer import load_specials, tokenizer_sha256

    if tokenizer_sha256(path) != tokenizer_sha256(tokenizer_dir):
        raise UsageError(f"{what} {spec}: its tokenizer differs from the policy's "
                         f"({tokenizer_dir}); a reward model must share the policy's "
                         "vocabulary")  # fmt: skip
    # the rows it trained on end each answer with the end-of-turn token (data/preferences.py)
    end = (load_specials(path).end_of_turn,)
    return RewardModel(_load_checkpoint(path, device), pad_id, end=end)
