"""Resume is bitwise also when a step draws randomness: dropout (the global generator, whose
state the training state saves and restores), masked-LM masks (the loop's per-micro-batch
generator) and LoRA dropout. Each run is killed after a step past a save and resumed in the
same process, whose global generator has moved on meanwhile, so a resume that forgot to
restore the random state trains on different dropout masks and ends on different weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmctl.model.gpt import GPT, preset
from llmctl.model.lora import apply_lora
from llmctl.train.batches import StepBatches
from llmctl.train.loop import Writer, micro_seed, train
from llmctl.train.objectives import LossOutput, MaskedLM, NextToken
from llmctl.train.settings import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
_rng = np.random.default_rng(3)
CORPUS = np.cumsum(_rng.integers(1, 4, 20_000)) % 50 + 8


def source(i: int) -> np.ndarray:
    """Micro-batch i: 4 windows of 17 tokens (random access, depends only on i)."""
    starts = (np.arange(i * 4, i * 4 + 4) * 7919) % (len(CORPUS) - 17)
    return np.stack([CORPUS[s : s + 17] for s in starts])


def gpt(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset("tiny", vocab_size=VOCAB, max_seq_len=32, **kw))


def lora_gpt(seed: int = 0) -> GPT:
    m = gpt(seed)
    apply_lora(m, r=2, alpha=4.0, dropout=0.3)
    return m


class Killed:
    """`inner` (an objective), raising KeyboardInterrupt on its `calls`-th call: a crash."""

    def __init__(self, inner, calls: int) -> None:
        self.inner, self.calls, self.n = inner, calls, 0
        self.extra_tokens = inner.extra_tokens

    def check(self, model: torch.nn.Module) -> None:
        self.inner.check(model)

    def __call__(self, *a, **k) -> LossOutput:
        self.n += 1
        if self.n == self.calls:
            raise KeyboardInterrupt
        return self.inner(*a, **k)


def losses(dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def straight_and_resumed(tmp: Path, make, objective, source, accum: int = 1, seed: int = 0):
    """(model trained straight, model killed in step 4 and resumed, their two run dirs)."""
    cfg = TrainSettings(steps=5, lr=3e-3, warmup=1, log_every=1, save_every=2, eval_every=0,
                        grad_accum=accum, seed=seed)  # fmt: skip
    a = make()
    train(a, StepBatches(source, accum=accum), objective(), cfg, Writer(tmp / "a", {"r": 1}))
    die = Killed(objective(), 3 * accum + 1)  # dies in step 4: the state of step 2 is saved
    with pytest.raises(KeyboardInterrupt):
        train(make(), StepBatches(source, accum=accum), die, cfg, Writer(tmp / "b", {"r": 1}))
    torch.rand(1000)  # whatever the process drew since, the resumed run must not see it
    b = make()
    train(b, StepBatches(source, accum=accum), objective(), cfg, Writer(tmp / "b", {"r": 1}))
    return a, b, tmp / "a", tmp / "b"


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("accum", [1, 2])
def test_dropout_resume_is_bitwise(tmp_path: Path, accum: int) -> None:
    a, b, da, db = straight_and_resumed(tmp_path, lambda: gpt(dropout=0.2), NextToken, source,
                                        accum)  # fmt: skip
    assert_same(a, b)
    assert losses(da) == losses(db) and len(losses(da)) == 5
    # the dropout draws matter: another seed (same weights, same data) trains differently
    c = gpt(dropout=0.2)
    cfg = TrainSettings(steps=5, lr=3e-3, warmup=1, log_every=1, save_every=2, eval_every=0,
                        grad_accum=accum, seed=1)  # fmt: skip
    train(c, StepBatches(source, accum=accum), NextToken(), cfg, Writer(tmp_path / "c", {}))
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))


def mlm() -> MaskedLM:
    return MaskedLM(mask_id=3, vocab_size=VOCAB, special_ids=range(8))


def test_masked_lm_with_dropout_resume_is_bitwise(tmp_path: Path) -> None:
    rows = lambda i: source(i)[:, :16]  # noqa: E731  (MLM takes [B, T] rows)
    a, b, da, db = straight_and_resumed(tmp_path, lambda: gpt(dropout=0.2, causal=False),
                                        mlm, rows)  # fmt: skip
    assert_same(a, b)
    assert losses(da) == losses(db)


def test_masked_lm_masks_come_from_the_step_seed() -> None:
    """The loop seeds its generator with micro_seed(seed, index) before each micro-batch: the
    masks of micro-batch i are those of a generator seeded so, whatever ran before."""
    tokens = torch.as_tensor(source(0)[:, :16])
    g = torch.Generator().manual_seed(micro_seed(0, 5))
    again = torch.Generator().manual_seed(micro_seed(0, 5))
    x, y = mlm().mask(tokens, g), mlm().mask(tokens, again)
    assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    assert micro_seed(0, 5) != micro_seed(0, 6) and micro_seed(0, 5) != micro_seed(1, 5)
    assert micro_seed(0, 5, 1) != micro_seed(0, 5)


def test_lora_dropout_resume_is_bitwise(tmp_path: Path) -> None:
    a, b, da, db = straight_and_resumed(tmp_path, lora_gpt, NextToken, source)
    assert_same(a, b)
    assert losses(da) == losses(db)
