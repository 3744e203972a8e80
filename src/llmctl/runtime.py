"""Process-wide runtime pieces: console output, progress, summaries, seeds, workers.

Output goes to stderr (stdout is kept for data a command prints, such as `generate` text or
`eval --json`). Progress is a rich bar with rate and ETA on a TTY and a plain line every
`PLAIN_EVERY_S` seconds otherwise; `--quiet` silences both.

Example:
    with progress("clean", total=n_bytes, unit="B") as p:
        p.advance(len(chunk))
    summary("clean", [("docs in", "300"), ("kept", "281")])
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True, highlight=False)
PLAIN_EVERY_S = 10.0
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence progress, info lines and summaries (warnings and errors still print)."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    """Whether `set_quiet(True)` is in force (to restore it after a quiet section)."""
    return _quiet


def info(msg: str) -> None:
    """One informational line on stderr, unless quiet."""
    if not _quiet:
        console.print(msg)


def warn(msg: str) -> None:
    """A visible warning on stderr, even when quiet."""
    console.print(f"[bold yellow]warning:[/] {msg}")


def default_workers() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class _Plain:
    """Progress as periodic plain lines, for logs and CI."""

    def __init__(self, desc: str, total: float | None, unit: str) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.done = 0.0
        self.start = self.last = time.monotonic()
        self.fields: dict[str, Any] = {}

    def advance(self, n: float = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.monotonic()
        if not _quiet and now - self.last >= PLAIN_EVERY_S:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            of = f"/{self.total:,.0f}" if self.total else ""
            extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
            console.print(f"{self.desc}: {self.done:,.0f}{of} {self.unit} ({rate:,.1f}/s) {extra}")


class _Bar:
    def __init__(self, prog: Progress, task: Any) -> None:
        self.prog, self.task = prog, task

    def advance(self, n: float = 1, **fields: Any) -> None:
        self.prog.update(self.task, advance=n, info=" ".join(f"{k}={v}" for k, v in fields.items()))


@contextmanager
def progress(desc: str, total: float | None = None, unit: str = "it") -> Iterator[Any]:
    """A progress reporter with `.advance(n, **fields)`; fields are shown beside the bar."""
    if _quiet or not console.is_terminal:
        yield _Plain(desc, total, unit)
        return
    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn() if unit == "it" else TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*cols, console=console, transient=True) as prog:
        yield _Bar(prog, prog.add_task(desc, total=total, info=""))


def summary(
    title: str, rows: Sequence[tuple[str, Any]], columns: tuple[str, str] = ("", "")
) -> None:
    """The table every stage prints when it ends: what went in, what came out, why, how fast."""
    if _quiet:
        return
    table = Table(title=title, title_justify="left", show_header=any(columns))
    table.add_column(columns[0])
    table.add_column(columns[1], justify="right")
    for key, value in rows:
        table.add_row(str(key), f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and (if imported) torch generators."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # numpy is a dependency; this only guards odd installs
        pass
    if "torch" in sys.modules:
        import torch

        torch.manual_seed(seed)


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"
