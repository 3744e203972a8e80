"""`llmctl pretrain` end to end on CPU: artifacts, exact resume after kills, signals, faults,
config changes, masked LM, and 2-process (gloo) data parallelism."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.artifacts import open_artifact
from llmctl.cli import app
from llmctl.model.io import load_config, load_model
from procs import run_tree

DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
BIN = Path(sys.executable).parent
TINY = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--device", "cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")


runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# Runs `pretrain.run` in a fresh process; optionally SIGKILLs itself at the N-th objective call
# (inside a step, e.g. between micro-batches) or right after the N-th state tensors file is
# written (inside a save, before its rename).
KILLER = """
import os, signal, sys
from pathlib import Path
from llmctl.commands import pretrain
from llmctl.config import load_config
from llmctl.train import objectives, state
where, n = sys.argv[3], int(sys.argv[4])
calls = [0]
def bump():
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
if where == "micro":
    call = objectives.NextToken.__call__
    def counted(self, *a, **k):
        bump()
        return call(self, *a, **k)
    objectives.NextToken.__call__ = counted
elif where == "save":
    save_file = state.save_file
    def counted_save(*a, **k):
        save_file(*a, **k)
        bump()
    state.save_file = counted_save
cfg = load_config(pretrain.PretrainConfig, None, sys.argv[5:])
pretrain.run(Path(sys.argv[1]), Path(sys.argv[2]), cfg)
"""


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokens"
    args = ["tokenize", str(DATA), "--out", str(out), "--vocab-size", "512"]
    res = runner.invoke(app, [*args, "--val-fraction", "0.1", "-q"])
    assert res.exit_code == 0, res.output
    return out


def pretrain(tokens: Path, out: Path, *args: str) -> object:
    return runner.invoke(app, ["pretrain", str(tokens), "--out", str(out), *TINY, "-q", *args])


def records(ckpt: Path) -> list[tuple]:
    """(step, loss, lr, grad_norm) of every train record: the figures resumption must keep."""
    rows = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in rows if "loss" in r]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pretrain_writes_a_checkpoint_whose_val_loss_falls(tokens: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    res = pretrain(tokens, out, "--steps", "40", "--set", "warmup=4", "--set", "eval_every=10")
    assert res.exit_code == 0, res.output
    files = {p.name for p in out.iterdir()}
    assert files == {"config.json", "manifest.json", "metrics.jsonl", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"}  # fmt: skip
    m = open_artifact(out, "checkpoint")
    s = m.stats
    assert s["steps"] == 40 and s["start_step"] == 0 and s["tokens_seen"] == 40 * 4 * 32
    assert s["params"] == load_model(out).num_params(non_embedding=False)
    assert load_config(out).vocab_size == 512 and s["mfu"] is None  # no MFU on CPU
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(val) == 4 and val == sorted(val, reverse=True) and val[-1] < math.log(512) - 0.5
    assert s["val_loss"] == val[-1] and s["train_loss"] < math.log(512) - 0.5
    assert m.config["preset"] == "tiny" and m.data["inputs"]["tokens"]["kind"] == "tokens"


@pytest.mark.slow
def test_kill_anywhere_and_resume_is_bitwise(tokens: Path, tmp_path: Path) -> None:
    sets = ["preset=tiny", "batch_size=4", "seq_len=32", "device=cpu", "steps=30",
            "grad_accum=2", "warmup=4", "save_every=5", "log_every=1", "eval_every=0"]  # fmt: skip
    opts = [x for s in sets[4:] for x in ("--set", s)]

    def killed(out: Path, where: str, n: int) -> int:
        cmd = [sys.executable, "-c", KILLER, str(tokens), str(out), where, str(n), *sets]
        return subprocess.run(cmd, capture_output=True, env=ENV).returncode

    def finish(out: Path) -> dict:
        res = pretrain(tokens, out, *opts)  # the same command again, in this process
        assert res.exit_code == 0, res.output
        assert records(out) == want
        assert sha(out / "model.safetensors") == sha(straight / "model.safetensors")
        return open_artifact(out, "checkpoint").stats

    straight = tmp_path / "straight"
    assert pretrain(tokens, straight, *opts).exit_code == 0
    want = records(straight)
    assert len(want) == 30

    # SIGKILL between the two micro-batches of step 8 (the state of step 5 is on disk)
    out = tmp_path / "micro"
    assert killed(out, "micro", 16) == -signal.SIGKILL
    assert not out.exists() and (tmp_path / ".micro.partial" / "_state" / "step-00000005").is_dir()
    assert finish(out)["start_step"] == 5

    # SIGKILL inside the second save, after its tensors were written, before the rename
    out = tmp_path / "save"
    assert killed(out, "save", 2) == -signal.SIGKILL
    assert finish(out)["start_step"] == 5

    # SIGTERM from outside, at whatever step the run has reached: state saved, exit 143
    out = tmp_path / "term"
    metrics = tmp_path / ".term.partial" / "metrics.jsonl"
    cli = [str(BIN / "llmctl"), "pretrain", str(tokens), *TINY, "-q", "--out", str(out)]
    proc = subprocess.Popen([*cli, *opts], stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 120
    while proc.poll() is None and (not metrics.exists() or metrics.read_text().count("\n") < 6):
        assert time.monotonic() < deadline, "no 6 logged steps in 120 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)  # reads stderr while waiting: a full pipe cannot block
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert "SIGTERM at step" in err.decode()
    assert finish(out)["start_step"] >= 6


def test_nan_stops_then_changed_config_is_refused(tokens: Path, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    common = ["--steps", "20", "--set", "warmup=1", "--set", "clip=0", "--set", "save_every=1"]
    res = pretrain(tokens, out, *common, "--lr", "1e30")
    assert res.exit_code == 2
    assert "stopped before the optimizer step" in res.output and "step" in res.output
    assert not out.exists()
    partial = tmp_path / ".ckpt.partial" / "_state"
    (state,) = [p for p in partial.iterdir() if p.name.startswith("step-")]
    assert f"step {int(state.name[5:]) + 1}:" in " ".join(res.output.split())
    res = pretrain(tokens, out, *common, "--lr", "0.001")
    assert res.exit_code == 2
    assert "lr: 1e+30 -> 0.001" in " ".join(res.output.split())


def test_mlm_pretrain_and_causal_model_refused(tokens: Path, tmp_path: Path) -> None:
    out = tmp_path / "mlm"
    res = pretrain(tokens, out, "--objective", "mlm", "--steps", "4", "--set", "warmup=1")
    assert res.exit_code == 0, res.output
    assert load_config(out).causal is False
    assert open_artifact(out, "checkpoint").stats["val_loss"] > 0
    bad = pretrain(tokens, tmp_path / "x", "--objective", "mlm", "--set", "model.causal=true")
    assert bad.exit_code == 2 and "bidirectional" in bad.output
    bad = pretrain(tokens, tmp_path / "y", "--set", "model.n_head=5")
    assert bad.exit_code == 2 and "model" in bad.output


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_with_double_accumulation(
    tokens: Path, tmp_path: Path, strategy: str
) -> None:
    args = ["pretrain", str(tokens), *TINY, "-q", "--steps", "6", "--set", "warmup=2",
            "--set", "log_every=1", "--set", "eval_every=0",
            "--set", f"distributed.strategy={strategy}"]  # fmt: skip
    one = tmp_path / "one"
    res = subprocess.run([str(BIN / "llmctl"), *args, "--out", str(one), "--set", "grad_accum=2"],
                         capture_output=True, env=ENV)  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()
    two = tmp_path / "two"
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2"]
    res = run_tree([*torchrun, str(BIN / "llmctl"), *args, "--out", str(two)], timeout=300,
                   capture_output=True, env=ENV)  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()[-3000:]
    a, b = records(one), records(two)
    assert [r[0] for r in a] == [r[0] for r in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        assert x[1] == pytest.approx(y[1], abs=1e-5) and x[2] == y[2]
    s1, s2 = open_artifact(one, "checkpoint").stats, open_artifact(two, "checkpoint").stats
    assert s2["world_size"] == 2 and s1["tokens_seen"] == s2["tokens_seen"]
    assert s2["val_loss"] == pytest.approx(s1["val_loss"], abs=1e-5)
