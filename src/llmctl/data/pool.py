"""An ordered, memory-bounded parallel map over worker processes.

Results come back in input order whatever the worker count, which is what makes data stages
byte-identical for `--workers 1` and `--workers N`. At most `4 × workers` batches are in
flight, so a fast reader cannot fill memory ahead of slow workers (multiprocessing's own
`imap` would read its whole input eagerly).

Example:
    batches = batched(records, 256)
    for out in ordered_map(process_batch, batches, workers=2, init=setup, initargs=(cfg,)):
        write(out)
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any


def ordered_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int,
    init: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[Any]:
    """Yield `fn(item)` for each item, in order, computed by `workers` processes.

    With `workers <= 1` everything runs in this process (no pickling, easy to debug).
    `fn` and `init` must be module-level functions; `init(*initargs)` runs once per worker.
    """
    if workers <= 1:
        if init is not None:
            init(*initargs)
        for item in items:
            yield fn(item)
        return
    # fork is cheap and keeps loaded modules; data stages do not start threads before this.
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(workers, initializer=init, initargs=initargs) as pool:
        pending: deque[Any] = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
