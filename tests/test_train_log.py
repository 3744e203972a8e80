"""What the loop logs and returns: metrics.jsonl rows (keys, token counts, the learning rate,
the window losses), validation at eval_every and before the first step (eval_first), probes,
the final evaluation and save, and TrainResult's figures — exact values, on the tiny GPT."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from llmctl.model.gpt import GPT, preset
from llmctl.train.batches import StepBatches
from llmctl.train.loop import Writer, as_dict, evaluate, train
from llmctl.train.objectives import LossOutput, NextToken
from llmctl.train.optim import Schedule
from llmctl.train.settings import TrainSettings
from llmctl.train.state import latest, read_meta

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64
_rng = np.random.default_rng(5)
CORPUS = np.cumsum(_rng.integers(1, 4, 20_000)) % 50 + 8
B, T = 4, 17  # rows per micro-batch, tokens per row (16 inputs + 1)


def source(i: int) -> np.ndarray:
    starts = (np.arange(i * B, (i + 1) * B) * 7919) % (len(CORPUS) - T)
    return np.stack([CORPUS[s : s + T] for s in starts])


def val() -> list[dict[str, torch.Tensor]]:
    return [{"tokens": torch.from_numpy(source(5000 + i))} for i in range(2)]


def gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset("tiny", vocab_size=VOCAB, max_seq_len=32))


def rows(dir: Path) -> list[dict]:
    return [json.loads(x) for x in (dir / "metrics.jsonl").read_text().splitlines()]


class Recorded(NextToken):
    """NextToken that keeps each step's summed loss and count (what the loop must log)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, float]] = []

    def __call__(self, model, batch, generator) -> LossOutput:
        out = super().__call__(model, batch, generator)
        if model.training:
            self.seen.append((float(out.total.detach()), float(out.count)))
        return out


def test_log_rows_hold_exact_tokens_lr_and_window_losses(tmp_path: Path) -> None:
    cfg = TrainSettings(steps=6, lr=2e-3, warmup=2, log_every=2, save_every=0, eval_every=0,
                        grad_accum=2)  # fmt: skip
    obj = Recorded()
    res = train(gpt(), StepBatches(source, accum=2), obj, cfg, Writer(tmp_path, {}))
    logged = [r for r in rows(tmp_path) if "loss" in r]
    assert [r["step"] for r in logged] == [2, 4, 6]
    keys = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}
    assert all(set(r) == keys for r in logged)
    # tokens: positions processed (16 inputs x 4 rows x 2 micro-batches per step), cumulative
    assert [r["tokens"] for r in logged] == [2 * 128, 4 * 128, 6 * 128]
    assert res.tokens_seen == 6 * 128
    sched = Schedule(2e-3, 2, 6, cfg.min_lr_ratio)
    assert [r["lr"] for r in logged] == [sched(1), sched(3), sched(5)]
    # the window loss: the mean over its steps of each step's summed loss / count
    steps = [obj.seen[2 * s : 2 * s + 2] for s in range(6)]
    per_step = [(a[0] + b[0]) / (a[1] + b[1]) for a, b in steps]
    for r, w in zip(logged, range(0, 6, 2), strict=True):
        assert r["loss"] == pytest.approx((per_step[w] + per_step[w + 1]) / 2, rel=1e-6)
    assert res.train_loss == logged[-1]["loss"]
    assert all(r["tokens_per_s"] > 0 and math.isfinite(r["grad_norm"]) for r in logged)
    assert all(type(r["tokens"]) is int and type(r["tokens_per_s"]) is float for r in logged)
    assert res.tokens_per_s is not None and res.tokens_per_s > 0 and res.mfu is None
    assert res.train_time_s > 0 and res.steps == 6 and res.start_step == 0
    # throughput is timed over steps 2-6 only (the first warms up), a part of train_time_s
    assert res.tokens_per_s >= 5 * 128 / res.train_time_s
    assert res.val_loss is None and res.metrics == {} and res.val_metrics == {}
    assert as_dict(res)["tokens_seen"] == 6 * 128


def test_validation_at_eval_every_first_and_last(tmp_path: Path) -> None:
    cfg = TrainSettings(steps=4, lr=2e-3, warmup=1, log_every=1, save_every=0, eval_every=2)
    m = gpt()
    res = train(m, StepBatches(source), NextToken(), cfg, Writer(tmp_path, {}), val=val,
                eval_first=True)  # fmt: skip
    evals = [r for r in rows(tmp_path) if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(r["val_items"] == 2 * B * (T - 1) for r in evals)
    assert all(set(r) == {"step", "wall_s", "val_loss", "val_items"} for r in evals)
    # the last evaluation is the trained model's loss on val, as evaluate() computes it
    assert res.val_loss == evals[-1]["val_loss"] == evaluate(m, val(), NextToken()).loss
    assert res.val_metrics == {"val_loss": res.val_loss, "val_items": 2 * B * (T - 1)}
    # eval_first: step 0 is the untrained model's loss
    assert evals[0]["val_loss"] == evaluate(gpt(), val(), NextToken()).loss
    assert evals[0]["val_loss"] > evals[-1]["val_loss"]


def test_eval_first_needs_something_to_evaluate_and_a_fresh_start(tmp_path: Path) -> None:
    cfg = TrainSettings(steps=2, lr=2e-3, warmup=1, log_every=1, save_every=1, eval_every=0)
    train(gpt(), StepBatches(source), NextToken(), cfg, Writer(tmp_path / "a", {}),
          eval_first=True)  # fmt: skip
    assert not [r for r in rows(tmp_path / "a") if "loss" not in r]  # no val, no probes
    # a resumed run (start > 0) does not evaluate step 0 again
    d = tmp_path / "b"
    cfg1 = TrainSettings(steps=3, lr=2e-3, warmup=1, log_every=1, save_every=1, eval_every=0)

    class Die(NextToken):
        n = 0

        def __call__(self, model, batch, generator):
            Die.n += model.training  # evaluation calls the objective too
            if Die.n == 3:
                raise KeyboardInterrupt
            return super().__call__(model, batch, generator)

    with pytest.raises(KeyboardInterrupt):
        train(gpt(), StepBatches(source), Die(), cfg1, Writer(d, {}), val=val, eval_first=True)
    res = train(gpt(), StepBatches(source), NextToken(), cfg1, Writer(d, {}), val=val,
                eval_first=True)  # fmt: skip
    assert res.start_step == 2
    assert [r["step"] for r in rows(d) if "val_loss" in r] == [0, 3]
    assert [r["step"] for r in rows(d) if "loss" in r] == [1, 2, 3]


def test_probes_see_eval_mode_and_their_figures_are_logged(tmp_path: Path) -> None:
    seen: list[tuple[int, bool, bool]] = []

    def probe(model, step: int) -> dict[str, float]:
        seen.append((step, model.training, torch.is_grad_enabled()))
        return {"probe_step": float(step)}

    cfg = TrainSettings(steps=4, lr=2e-3, warmup=1, log_every=2, save_every=2, eval_every=2)
    res = train(gpt(), StepBatches(source), NextToken(), cfg, Writer(tmp_path, {}),
                probes=[probe])  # fmt: skip
    assert seen == [(2, False, False), (4, False, False)]
    assert res.val_metrics == {"probe_step": 4.0} and res.val_loss is None
    assert [r for r in rows(tmp_path) if "probe_step" in r] == [
        {"step": 2, "probe_step": 2.0}, {"step": 4, "probe_step": 4.0}
    ]  # fmt: skip
    # the final state is saved at the last step, its counters with it
    path, meta = read_meta(tmp_path / "_state")
    assert meta["step"] == 4 and path == latest(tmp_path / "_state")
    assert meta["counters"]["tokens_seen"] == 4 * B * (T - 1)


def test_a_rerun_after_the_last_save_adds_nothing(tmp_path: Path) -> None:
    """A run killed after its final save (before publishing) is rerun: it must neither train
    nor evaluate again, so metrics.jsonl stays as it was."""
    cfg = TrainSettings(steps=3, lr=2e-3, warmup=1, log_every=1, save_every=0, eval_every=0)
    for kw in ({"val": val}, {"probes": [lambda model, step: {"probe": 1.0}]}):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        first = train(gpt(), StepBatches(source), NextToken(), cfg, Writer(d, {}), **kw)
        before = (d / "metrics.jsonl").read_text()
        again = train(gpt(), StepBatches(source), NextToken(), cfg, Writer(d, {}), **kw)
        assert (d / "metrics.jsonl").read_text() == before
        assert again.start_step == 3 and again.val_metrics == first.val_metrics


def test_sigterm_saves_the_state_of_the_step_it_stopped_after(tmp_path: Path) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("the loop installs its signal handlers only in the main thread")

    class Term(NextToken):
        n = 0

        def __call__(self, model, batch, generator):
            Term.n += 1
            if Term.n == 2:  # during step 2: the loop finishes it, saves, then exits
                os.kill(os.getpid(), signal.SIGTERM)
            return super().__call__(model, batch, generator)

    cfg = TrainSettings(steps=5, lr=2e-3, warmup=1, log_every=1, save_every=0, eval_every=0)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        train(gpt(), StepBatches(source), Term(), cfg, Writer(tmp_path, {}))
    assert e.value.code == 128 + signal.SIGTERM
    path, meta = read_meta(tmp_path / "_state")
    assert meta["step"] == 2 and path.name == "step-00000002"
    assert signal.getsignal(signal.SIGTERM) == handler  # the handler is put back


def test_a_state_saved_without_window_metrics_still_resumes(tmp_path: Path) -> None:
    """States written before the loop saved its window metrics have no such key: they resume
    with an empty window."""
    cfg = TrainSettings(steps=3, lr=2e-3, warmup=1, log_every=1, save_every=1, eval_every=0)

    class Die(NextToken):
        n = 0

        def __call__(self, model, batch, generator):
            Die.n += 1
            if Die.n == 2:
                raise KeyboardInterrupt
            return super().__call__(model, batch, generator)

    with pytest.raises(KeyboardInterrupt):
        train(gpt(), StepBatches(source), Die(), cfg, Writer(tmp_path, {}))
    path, meta = read_meta(tmp_path / "_state")
    del meta["ranks"][0]["window_metrics"]
    (path / "state.json").write_text(json.dumps(meta))
    res = train(gpt(), StepBatches(source), NextToken(), cfg, Writer(tmp_path, {}))
    assert res.start_step == 1 and [r["step"] for r in rows(tmp_path)] == [1, 2, 3]


def test_a_rerun_after_a_crash_before_any_save_logs_each_step_once(tmp_path: Path) -> None:
    cfg = TrainSettings(steps=3, lr=2e-3, warmup=1, log_every=1, save_every=0, eval_every=0)

    class Die(NextToken):
        n = 0

        def __call__(self, model, batch, generator):
            Die.n += 1
            if Die.n == 3:  # steps 1 and 2 logged, nothing saved
                raise KeyboardInterrupt
            return super().__call__(model, batch, generator)

    with pytest.raises(KeyboardInterrupt):
        train(gpt(), StepBatches(source), Die(), cfg, Writer(tmp_path, {}))
    assert [r["step"] for r in rows(tmp_path)] == [1, 2]
    res = train(gpt(), StepBatches(source), NextToken(), cfg, Writer(tmp_path, {}))
    assert res.start_step == 0 and [r["step"] for r in rows(tmp_path)] == [1, 2, 3]


def test_clip_zero_means_no_clipping(tmp_path: Path) -> None:
    """clip = 0 turns clipping off: the same weights as an unreachable clip, not a zero one."""

    def weights(clip: float) -> list[torch.Tensor]:
        cfg = TrainSettings(steps=2, lr=2e-3, warmup=1, log_every=1, save_every=0,
                            eval_every=0, clip=clip)  # fmt: skip
        m = gpt()
        train(m, StepBatches(source), NextToken(), cfg, Writer(tmp_path / str(clip), {}))
        return [p.detach().clone() for p in m.parameters()]

    off, huge, tight = weights(0.0), weights(1e9), weights(1e-3)
    assert all(torch.equal(a, b) for a, b in zip(off, huge, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(off, tight, strict=True))
