"""An ordered, memory-bounded parallel map over worker processes.

Results come back in input order whatever the worker count, which is what makes data stages
byte-identical for `--workers 1` and `--workers N`. At most `4 × workers` batches are in
flight, so a fast reader cannot fill memory ahead of slow workers (multiprocessing's own
`imap` would read its whole input eagerly).

A worker that dies (the OOM killer, a signal) stops the map at once with `WorkerDied`.
Neither of the standard library's pools can be trusted with that: `multiprocessing.Pool`
replaces the worker and waits forever for the batch it lost, and Python 3.11's
`ProcessPoolExecutor` can deadlock while it tears the broken pool down (a surviving worker
blocked sending its result, the executor joining a feeder thread blocked on a full pipe). So
this map drives its workers itself: one pipe each, one batch in flight per worker (a batch
is sent only to a worker that is waiting for one, so neither side ever blocks sending to the
other), and the workers' process sentinels watched beside their pipes.

Example:
    batches = batched(records, 256)
    for out in ordered_map(process_batch, batches, workers=2, init=setup, initargs=(cfg,)):
        write(out)
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
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
    runs once per worker. An exception raised by `fn` or `init` is raised here, after the
    results of the items before it, as it would be in-process.
    """
    if workers <= 1:
        if init is not None:
            init(*initargs)
        for item in items:
            yield fn(item)
        return
    ctx = _context(fn)
    procs, conns = [], []
    finished = False
    try:
        for _ in range(workers):
            here, there = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(there, fn, init, initargs), daemon=True)
            p.start()
            there.close()
            procs.append(p)
            conns.append(here)
        yield from _drive(items, procs, conns, workers)
        finished = True
    finally:
        for c in conns:
            c.close()  # a worker waiting for a batch reads end-of-file and returns
        for p in procs:
            # An error, Ctrl-C or a consumer that stopped early: the batches still being
            # computed are not wanted, so their workers are ended now.
            if not finished and p.is_alive():
                p.terminate()
            p.join()


def _drive(
    items: Iterable[Any], procs: list[Any], conns: list[Connection], workers: int
) -> Iterator[Any]:
    source = iter(items)
    idle = list(range(len(procs)))  # workers waiting for a batch
    busy: set[int] = set()  # workers computing a batch (its index comes back with the result)
    done: dict[int, tuple[bool, Any]] = {}  # index -> (ok, result or exception), not yet yielded
    sent = next_out = 0
    exhausted = False
    while True:
        while idle and not exhausted and sent - next_out < 4 * workers:
            item = next(source, _END)
            if item is _END:
                exhausted = True
                break
            w = idle.pop()
            try:
                conns[w].send((sent, item))
            except OSError:  # BrokenPipeError: it died while waiting
                raise _died(workers) from None
            busy.add(w)
            sent += 1
        while next_out in done:
            ok, value = done.pop(next_out)
            next_out += 1
            if not ok:
                raise value
            yield value
        if exhausted and next_out == sent:
            return
        if not busy:
            continue  # every batch sent has been yielded: read more input
        watched = {conns[w]: w for w in busy} | {procs[w].sentinel: w for w in busy}
        for ready in wait(list(watched)):
            w = watched[ready]
            if w not in busy:
                continue  # its result and its sentinel were both ready: handled already
            try:
                index, ok, value = conns[w].recv()
            except (EOFError, OSError):
                raise _died(workers) from None
            done[index] = (ok, value)
            busy.discard(w)
            idle.append(w)


_END = object()


def _died(workers: int) -> WorkerDied:
    return WorkerDied(
        f"a worker process of --workers {workers} died (killed by a signal: out of memory?); "
        "rerun, with fewer workers if memory ran out"
    )


def _serve(
    conn: Connection,
    fn: Callable[[Any], Any],
    init: Callable[..., None] | None,
    initargs: tuple[Any, ...],
) -> None:
    """A worker: `init` once, then `fn` on each batch sent until the pipe closes. Exceptions
    travel back as results; an exception from `init` answers every batch."""
    failed: Exception | None = None
    try:
        if init is not None:
            init(*initargs)
    except Exception as e:
        failed = e
    try:
        while True:
            try:
                index, item = conn.recv()
            except EOFError:
                return  # the map is over
            try:
                if failed is not None:
                    raise failed
                reply = (index, True, fn(item))
            except Exception as e:
                reply = (index, False, e)
            try:
                conn.send(reply)
            except Exception as e:  # an exception that cannot be pickled: its text travels
                conn.send((index, False, RuntimeError(f"{type(e).__name__}: {e}")))
    except KeyboardInterrupt:
        return  # Ctrl-C reaches the whole process group; the map reports it, not each worker


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
