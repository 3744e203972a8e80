"""Run a command that starts a tree of processes (torchrun and its ranks, make and its
recipes) with a deadline that ends the whole tree.

`subprocess.run(timeout=...)` kills only the direct child. A grandchild that inherited the
stdout/stderr pipes (a hung rank, a recipe's llmctl) keeps them open, so run's last read then
waits for it forever and the test hangs instead of failing. Here the command leads its own
process group, and the whole group is killed on a timeout or any other exit from the wait.

Example:
    res = run_tree([*torchrun, "llmctl", "pretrain", ...], timeout=300, capture_output=True)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from typing import Any


def run_tree(cmd: Sequence[str], timeout: float, capture_output: bool = False,
             **kwargs: Any) -> subprocess.CompletedProcess:  # fmt: skip
    """`subprocess.run(cmd, timeout=timeout, ...)`, killing every process the command started
    when the deadline passes (TimeoutExpired is raised as by `subprocess.run`)."""
    if capture_output:
        kwargs |= {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with subprocess.Popen(cmd, start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
