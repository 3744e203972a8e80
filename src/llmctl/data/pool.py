"""An ordered, memory-bounded parallel map over worker processes.

Results come back in input order whatever the worker count, which is what makes data stages
byte-identical for `--workers 1` and `--workers N`. At most `4 × workers` batches are in
flight, so a fast reader cannot fill memory ahead of slow workers (multiprocessing's own
`imap` would read its whole input eagerly). A worker that dies (the OOM killer, a signal)
stops the map with `WorkerDied` at once; multiprocessing's `Pool` would replace the worker,
lose its batch and wait for that batch forever.

Example:
    batches = batched(records, 256)
    for out in ordered_map(process_batch, batches, workers=2, init=setup, initargs=(cfg,)):
        write(out)
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from llmctl.errors import WorkerDied


def ordered_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    workers: int,
    init: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> Iterator[Any]:
    """Yield `fn(item)` for each item, in order, computed by `workers` processes.

    With `workers <= 1` everything runs in this process (no pickling, easy to debug).
    `fn` and `init` must be module-level functions, and `initargs` picklable; `init(*initargs)`
    runs once per worker. An exception raised by `fn` is raised here, as it would be in-process.
    """
    if workers <= 1:
        if init is not None:
            init(*initargs)
        for item in items:
            yield fn(item)
        return
    pool = ProcessPoolExecutor(
        workers, _context(fn), initializer=_init_worker, initargs=(init, initargs)
    )
    pending: deque[Future[Any]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(_run, fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise WorkerDied(
            f"a worker process of --workers {workers} died (killed by a signal: out of memory?); "
            "rerun, with fewer workers if memory ran out"
        ) from None
    finally:
        # On an error or an early stop the queued batches are dropped, not computed.
        pool.shutdown(wait=True, cancel_futures=True)


_init_error: Exception | None = None  # per worker process: what its `init` raised, if anything


def _init_worker(init: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
    # An exception escaping an initializer kills the worker and breaks the whole pool with a
    # message about dead processes; kept, it reaches the caller from the first task instead,
    # as it would in-process (a UsageError stays a one-line usage error).
    global _init_error
    try:
        if init is not None:
            init(*initargs)
    except Exception as e:
        _init_error = e


def _run(fn: Callable[[Any], Any], item: Any) -> Any:
    if _init_error is not None:
        raise _init_error
    return fn(item)


def _context(fn: Callable[[Any], Any]) -> Any:
    """Worker processes forked from a fork server, never from this process.

    A plain fork copies this process with its locks but not its threads: if a rich progress
    bar, torch's thread pool or a test runner's I/O thread holds a lock at that moment, a
    worker that later takes it waits forever, and so does the map. The fork server is a
    fresh single-threaded process, started once per command, that has imported `fn`'s module,
    so each worker still starts in milliseconds. Where there is no fork server, spawn.
    """
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([fn.__module__])  # no effect once the server runs: harmless
    return ctx
