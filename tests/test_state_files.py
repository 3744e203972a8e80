"""The training state on disk (train/state.py): where save_state writes, what it cleans up,
how read_meta refuses a corrupted or foreign state, and the random state's round trip."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llmctl.errors import UsageError
from llmctl.model.gpt import GPT, preset
from llmctl.train.optim import build_optimizer
from llmctl.train.state import (
    META,
    TENSORS,
    latest,
    read_meta,
    restore,
    rng_state,
    save_state,
    set_rng_state,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(preset("tiny", vocab_size=32, max_seq_len=16))


def saved(state_dir: Path, step: int = 3) -> tuple[GPT, Path]:
    m = gpt()
    opt = build_optimizer(m, lr=1e-3)
    m(torch.randint(0, 32, (2, 8)), labels=torch.randint(0, 32, (2, 8)))[0].backward()
    opt.step()
    path = save_state(state_dir, step=step, model=m, optimizer=opt, meta={"counters": {"n": 1}})
    return m, path


def test_save_creates_missing_parents_and_cleans_leftovers(tmp_path: Path) -> None:
    state_dir = tmp_path / "run" / "deep" / "_state"
    _, first = saved(state_dir, step=1)
    assert first == state_dir / "step-00000001" and latest(state_dir) == first
    # leftovers of killed saves and deletes: a temporary dir, a trash dir
    (state_dir / ".tmp-step-00000002-999").mkdir()
    (state_dir / ".trash-step-00000000").mkdir()
    (state_dir / ".trash-step-00000000" / "x").write_text("x")
    _, second = saved(state_dir, step=2)
    assert sorted(p.name for p in state_dir.iterdir()) == ["step-00000002"]
    assert latest(state_dir) == second
    path, meta = read_meta(state_dir)
    assert path == second and meta["step"] == 2 and meta["counters"] == {"n": 1}


def test_latest_takes_the_highest_complete_step(tmp_path: Path) -> None:
    assert latest(tmp_path / "none") is None and read_meta(tmp_path / "none") is None
    for step in (9, 10, 100_000_000):
        (tmp_path / f"step-{step:08d}").mkdir()
        (tmp_path / f"step-{step:08d}" / META).write_text("{}")
    (tmp_path / "step-99999999999").mkdir()  # no state.json: incomplete, ignored
    (tmp_path / "step-1").mkdir()  # not the pattern
    (tmp_path / "step-1" / META).write_text("{}")
    assert latest(tmp_path) == tmp_path / "step-100000000"
    assert latest(tmp_path / "step-1") is None


def test_read_meta_refuses_a_corrupted_or_foreign_state(tmp_path: Path) -> None:
    _, path = saved(tmp_path)
    meta = json.loads((path / META).read_text())
    (path / META).write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(UsageError, match=r"state\.json: unknown state format 99"):
        read_meta(tmp_path)
    (path / META).write_text(json.dumps(meta))
    data = bytearray((path / TENSORS).read_bytes())
    data[-1] ^= 1
    (path / TENSORS).write_bytes(bytes(data))
    with pytest.raises(UsageError, match=r"state\.safetensors: sha256 differs from state\.json"):
        read_meta(tmp_path)
    (path / META).write_text("{not json")
    with pytest.raises(UsageError, match="unreadable training state"):
        read_meta(tmp_path)


def test_restore_refuses_another_models_state(tmp_path: Path) -> None:
    _, path = saved(tmp_path)
    _, meta = read_meta(tmp_path)
    other = GPT(preset("tiny", vocab_size=32, max_seq_len=16, n_layer=3))
    with pytest.raises(UsageError, match="training state lacks"):
        restore(other, build_optimizer(other, lr=1e-3), path / TENSORS, meta)
    m = gpt()
    opt = build_optimizer(m, lr=1e-3)
    restore(m, opt, path / TENSORS, meta)
    want, _ = saved(tmp_path / "again")
    for p, q in zip(m.parameters(), want.parameters(), strict=True):
        assert torch.equal(p, q)
    assert all(len(opt.state[p]) == 3 for p in m.parameters())  # step, exp_avg, exp_avg_sq


def test_rng_state_round_trips_every_generator_through_json() -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = json.loads(json.dumps(rng_state()))
    assert state["cuda"] == [] or torch.cuda.is_available()
    want = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random(), np.random.standard_normal())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert got[2] == want[2] and got[3] == want[3]
    assert np.random.get_state()[1].dtype == np.uint32
