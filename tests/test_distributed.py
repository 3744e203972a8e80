"""Several training processes under `torchrun` on CPU (gloo), as users run them on GPUs:
only rank 0 writes, a killed run resumes on both ranks to the same weights, and a rank that
dies or hangs ends the run with an error (no hang) that the same command then resumes.

Each run is the real CLI (`llmctl.cli.app`) started by `torchrun --standalone` through a small
driver that can arm a fault on rank 1 only: a guard that fails any write (rank 0 alone may
write), a SIGKILL at its N-th objective call, or a sleep there (a hung rank); or the same
SIGKILL on rank 0, the rank that writes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.artifacts import open_artifact, partial_dir
from llmctl.cli import app
from procs import run_tree

DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("torchrun")]

DRIVER = r"""
import builtins, io, os, shutil, signal, sys, time
from pathlib import Path

fault, rank = os.environ.get("FAULT", ""), int(os.environ["RANK"])
if rank == 1 and fault == "guard":
    root = os.path.realpath(os.environ["GUARD_ROOT"])

    def inside(path):
        try:
            return os.path.realpath(os.fsdecode(path)).startswith(root)
        except TypeError:
            return False

    def refuse(what, path):
        raise AssertionError(f"rank 1 {what} {path}")

    def guarded(real, what, writes=lambda *a, **k: True):
        def call(path, *a, **k):
            if inside(path) and writes(*a, **k):
                refuse(what, path)
            return real(path, *a, **k)
        return call

    def writing(mode="r", *a, **k):
        return any(c in mode for c in "wax+")

    builtins.open = io.open = guarded(builtins.open, "opened for writing", writing)
    os.open = guarded(os.open, "os.open",
                      lambda flags, *a, **k: flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    for name in ("replace", "rename", "mkdir", "makedirs", "remove", "unlink", "rmdir"):
        setattr(os, name, guarded(getattr(os, name), name))
    shutil.rmtree = guarded(shutil.rmtree, "rmtree")
    import safetensors.torch, torch
    safetensors.torch.save_file = (lambda t, path, *a, **k: refuse("save_file", path))
    torch.save = lambda obj, path, *a, **k: refuse("torch.save", path)
elif (rank == 1 and fault in ("kill", "hang")) or (rank == 0 and fault == "kill0"):
    from llmctl.train import objectives
    at, calls = int(os.environ["FAULT_AT"]), [0]
    real = objectives.NextToken.__call__

    def counted(self, *a, **k):
        calls[0] += 1
        if calls[0] == at:
            if fault in ("kill", "kill0"):
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(3600)
        return real(self, *a, **k)

    objectives.NextToken.__call__ = counted

from llmctl.cli import app
sys.argv = ["llmctl", *sys.argv[1:]]
app()
"""


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokens"
    args = ["tokenize", str(DATA), "--out", str(out), "--vocab-size", "512"]
    res = CliRunner().invoke(app, [*args, "--val-fraction", "0.1", "-q"])
    assert res.exit_code == 0, res.output
    return out


def pretrain_args(tokens: Path, out: Path, strategy: str = "ddp") -> list[str]:
    return ["pretrain", str(tokens), "--out", str(out), "--preset", "tiny", "--batch-size", "4",
            "--seq-len", "32", "--device", "cpu", "--steps", "8", "--set", "warmup=2",
            "--set", "log_every=1", "--set", "eval_every=4", "--set", "save_every=2",
            "--set", f"distributed.strategy={strategy}", "-q"]  # fmt: skip


def torchrun(tmp_path: Path, args: list[str], env: dict[str, str] | None = None,
             timeout: float = 240) -> subprocess.CompletedProcess:  # fmt: skip
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(driver), *args]
    return run_tree(cmd, timeout, capture_output=True, text=True, env={**ENV, **(env or {})})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_only_rank_0_writes(tokens: Path, tmp_path: Path, strategy: str) -> None:
    """Rank 1 runs with every write under the output's folder refused (open for writing,
    os.replace/mkdir/remove, rmtree, safetensors and torch.save): the run still succeeds, so
    rank 1 wrote nothing; the artifact holds exactly what a one-process run's holds."""
    work = tmp_path / "work"
    work.mkdir()
    res = torchrun(tmp_path, pretrain_args(tokens, work / "two", strategy),
                   {"FAULT": "guard", "GUARD_ROOT": str(work)})  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    one = tmp_path / "one"
    single = CliRunner().invoke(app, pretrain_args(tokens, one, strategy))
    assert single.exit_code == 0, single.output
    two = open_artifact(work / "two", "checkpoint")
    assert set(two.files) == set(open_artifact(one, "checkpoint").files)
    assert sorted(p.name for p in work.iterdir()) == ["two"]  # no partial, no stray folder
    assert two.stats["world_size"] == 2


def test_a_killed_run_resumes_on_both_ranks_to_the_same_weights(
    tokens: Path, tmp_path: Path
) -> None:
    """SIGKILL rank 0 (the writer) inside step 6, after step 4's state was saved (torchrun
    then stops rank 1), and run the same command again: the weights and the loss curve equal
    an uninterrupted 2-process run's."""
    whole = torchrun(tmp_path, pretrain_args(tokens, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    out = tmp_path / "resumed"
    killed = torchrun(tmp_path, pretrain_args(tokens, out), {"FAULT": "kill0", "FAULT_AT": "11"})
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr
    assert not (out / "manifest.json").exists()
    assert any((partial_dir(out) / "_state").glob("step-*"))
    again = torchrun(tmp_path, pretrain_args(tokens, out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert sha(out / "model.safetensors") == sha(tmp_path / "whole" / "model.safetensors")
    assert losses(out) == losses(tmp_path / "whole")


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_rank_that_dies_or_hangs_fails_the_run_then_it_resumes(
    tokens: Path, tmp_path: Path, fault: str
) -> None:
    """Rank 1 is SIGKILLed, or stops answering, at its 11th objective call (inside step 6,
    after step 4's state was saved): the run exits non-zero well inside the timeout (no hang),
    rank 0 says so in one line, nothing is published, and the same command resumes."""
    out = tmp_path / "out"
    began = time.monotonic()
    res = torchrun(tmp_path, pretrain_args(tokens, out),
                   {"FAULT": fault, "FAULT_AT": "11", "LLMCTL_DIST_TIMEOUT_S": "15"},
                   timeout=180)  # fmt: skip
    assert res.returncode != 0 and time.monotonic() - began < 150
    assert not (out / "manifest.json").exists()
    assert any((partial_dir(out) / "_state").glob("step-*"))
    if fault == "hang":  # rank 0 sees the collective time out and says what to do
        errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error: rank 0 of 2")]
        assert len(errors) == 1, res.stderr[-3000:]
        assert "rerun the same command to resume" in errors[0]
    again = torchrun(tmp_path, pretrain_args(tokens, out))
    assert again.returncode == 0, again.stderr[-3000:]
    steps = [s for s, _ in losses(out)]
    assert steps == list(range(1, 9))
    assert open_artifact(out, "checkpoint").stats["world_size"] == 2
