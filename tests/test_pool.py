"""The local engine's process pool (`data/pool.ordered_map`): results in input order for any
worker count, a worker's exception raised as in-process, and a dead worker stopping the map
with one line instead of the wait forever that multiprocessing's Pool gives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from multiprocessing import forkserver
from pathlib import Path

import pytest

from llmctl.data.pool import ordered_map
from llmctl.errors import UsageError, WorkerDied

DATA = Path(__file__).parent / "data" / "web"
_offset = 0  # set by _setup in each worker


# Module-level: the workers import this module to find them (fork server, not fork).
def _setup(offset: int) -> None:
    global _offset
    if offset < 0:
        raise UsageError("offset must not be negative")
    _offset = offset


def _square(x: int) -> tuple[int, int]:
    return x, x * x + _offset


def _fail_at_7(x: int) -> int:
    if x == 7:
        raise ValueError("bad item 7")
    return x


def _die_at_7(x: int) -> int:
    if x == 7:
        os._exit(1)  # as the OOM killer would end it: no exception, no cleanup
    return x


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_results_come_in_input_order_with_init_run_in_each_worker(workers: int) -> None:
    out = list(ordered_map(_square, range(60), workers, _setup, (5,)))
    assert out == [(x, x * x + 5) for x in range(60)]


@pytest.mark.parametrize("workers", [1, 2])
def test_an_exception_in_fn_or_init_is_raised_as_in_process(workers: int) -> None:
    with pytest.raises(ValueError, match="bad item 7"):
        list(ordered_map(_fail_at_7, range(20), workers))
    with pytest.raises(UsageError, match="offset must not be negative"):
        list(ordered_map(_square, range(20), workers, _setup, (-1,)))


def test_a_dead_worker_stops_the_map_with_one_line() -> None:
    began = time.monotonic()
    got = []
    with pytest.raises(WorkerDied, match="worker process of --workers 2 died"):
        got.extend(ordered_map(_die_at_7, range(40), 2))
    assert got == list(range(len(got))) and len(got) <= 7  # in order, nothing after the loss
    assert time.monotonic() - began < 60


def test_stopping_early_leaves_no_worker_behind() -> None:
    gen = ordered_map(_square, range(1000), 2)
    assert next(gen) == (0, 0)
    gen.close()  # cancels the queued items and joins the workers
    server = forkserver._forkserver._forkserver_pid  # the workers' parent
    assert server and not _children_of(server)


def _children_of(pid: int, grand: bool = False) -> list[int]:
    """Live child processes of `pid` (with `grand`, their children instead), from /proc."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(stat.parent.name))
    return [g for k in kids for g in _children_of(k)] if grand else kids


@pytest.mark.slow
def test_clean_with_a_worker_killed_exits_1_in_one_line_and_publishes_nothing(
    tmp_path: Path,
) -> None:
    big = tmp_path / "big.jsonl"
    big.write_bytes((DATA / "c4_demo.jsonl").read_bytes() * 150)  # a few seconds of cleaning
    out = tmp_path / "docs"
    cmd = [sys.executable, "-m", "llmctl.cli", "clean", str(big), "--out", str(out), "-j", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (workers := _children_of(proc.pid, grand=True)):  # fork server → workers
        assert proc.poll() is None and time.monotonic() < deadline, "no worker appeared"
        time.sleep(0.01)
    os.kill(workers[0], signal.SIGKILL)
    try:
        output, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()  # a no-op once it exited; a hung run must not outlive the test
    assert proc.returncode == 1, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: a worker process of --workers 2 died (killed by a signal: out of memory?); "
        "rerun, with fewer workers if memory ran out"
    ], output
    assert "Traceback" not in output and not out.exists()
