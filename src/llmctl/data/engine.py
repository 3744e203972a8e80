"""Where the data stages' per-block work runs: this machine's process pool, or a Ray cluster.

`clean`, `dedup` and `tokenize` hand their blocks of records to `engine.map(fn, blocks, init,
initargs)` and get the results back in input order; the driver (this process) reads the
inputs, writes every output file and publishes the artifact exactly as with the local pool. The
engines differ only in where `fn` runs, so the artifact is byte-identical for `local` and
`ray`, any worker count and any block size.

- `local`: `llmctl.data.pool.ordered_map` over worker processes (forked from a fork server).
- `ray`: one Ray task per block. Tasks, not Ray Data: the stages already stream their input in
  order and need the results back in that order into one writer (shard numbering, the val tail
  rule, errors.jsonl by file:line), with a per-process setup (`init`: the fastText model, the
  tokenizer) run once per worker and reused by later tasks. Ray Data would re-order blocks
  unless told to preserve order, would have to re-implement our readers (WARC, parquet,
  docs artifacts, file:line errors) as datasources, and would add pandas/pyarrow conversions
  of every record; a bounded window of tasks does what the local pool does, across nodes.
  Ray retries a task whose worker process died (`max_retries`), so a lost node or a killed
  worker costs a re-run of its blocks, not a different output.

The driver reads the inputs and writes the outputs; only blocks of raw records and their
results travel through Ray's object store, so the paths must be visible to the driver (a
shared filesystem lets the command run from any node). Ray is an optional extra:
`pip install 'llmctl[ray]'`, on every node.

Example:
    with open_engine(EngineConfig(kind="ray"), workers=0) as engine:
        for out in engine.map(_clean_batch, batches, _init, (cfg,)):
            write(out)
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from llmctl.config import helpful
from llmctl.data.pool import ordered_map
from llmctl.errors import UsageError
from llmctl.runtime import default_workers

# Test hook: when this names a file path, the first Ray task to create that file (O_EXCL, so
# once per cluster on a shared filesystem) kills its own worker process after computing its
# result; Ray must retry the task and the artifact must not change.
KILL_ONCE_ENV = "LLMCTL_TEST_KILL_ONE_TASK"
RAY_HINT = "--engine ray needs Ray: pip install 'llmctl[ray]'"


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the engine a data stage runs its per-block work on."""

    kind: Literal["local", "ray"] = helpful(
        "local", "local: this machine's process pool; ray: tasks on a Ray cluster"
    )
    address: str = helpful(
        "auto",
        "Ray cluster to join (ray only): auto = the running one (RAY_ADDRESS, `ray start`), "
        "else start a local Ray; local = always a new local Ray; or HOST:PORT, ray://HOST:PORT",
    )


def import_ray() -> Any:
    """The `ray` module, or a one-line UsageError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise UsageError(RAY_HINT) from None
    return ray


class LocalEngine:
    """Blocks on this machine's process pool (`ordered_map`)."""

    name = "local"

    def __init__(self, workers: int) -> None:
        self.workers = workers or default_workers()

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[Any],
        init: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
        workers: int | None = None,
    ) -> Iterator[Any]:
        """`fn(item)` for each item, in order (`workers` overrides the engine's count)."""
        return ordered_map(fn, items, self.workers if workers is None else workers, init, initargs)


# --- the Ray side ----------------------------------------------------------------------------

_initialized: str | None = None  # per Ray worker process: which map's `init` ran here last


class _Failed:
    """A UsageError raised inside a task, carried back as data so the CLI prints one line."""

    def __init__(self, message: str) -> None:
        self.message = message


def _task(
    fn: Callable[[Any], Any],
    init: Callable[..., None] | None,
    initargs: tuple[Any, ...],
    key: str,
    kill_marker: str,
    item: Any,
) -> Any:
    """One block in a Ray worker: the map's `init` once per process, then `fn(item)`."""
    global _initialized
    try:
        if _initialized != key:
            if init is not None:
                init(*initargs)
            _initialized = key
        out = fn(item)
    except UsageError as e:
        return _Failed(str(e))
    if kill_marker:
        try:
            os.close(os.open(kill_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            os._exit(1)  # the worker process dies mid-task; Ray retries the task elsewhere
    return out


class RayEngine:
    """Blocks as Ray tasks, results yielded in input order.

    At most `workers` tasks run at once (0 = every CPU of the cluster) and at most 4 × workers
    results wait for the head of the line, so memory stays bounded whatever the input size.
    """

    name = "ray"

    def __init__(self, ray: Any, workers: int) -> None:
        self.ray = ray
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.cluster_cpus = max(cpus, 1)
        self.workers = workers or self.cluster_cpus
        # One-CPU tasks; a worker dying mid-task (node lost, OOM-killed, the test hook) is a
        # system failure that Ray retries; exceptions of our own code are not retried.
        self._remote = ray.remote(num_cpus=1, max_retries=4)(_task)

    def remote(self, fn: Callable[..., Any], **options: Any) -> Any:
        """`fn` as a Ray remote function (for stages with their own task graph, e.g. dedup)."""
        return self.ray.remote(num_cpus=1, max_retries=4, **options)(fn)

    def get(self, refs: Any) -> Any:
        return self.ray.get(refs)

    def put(self, value: Any) -> Any:
        return self.ray.put(value)

    def map(
        self,
        fn: Callable[[Any], Any],
        items: Iterable[Any],
        init: Callable[..., None] | None = None,
        initargs: tuple[Any, ...] = (),
        workers: int | None = None,
    ) -> Iterator[Any]:
        """`fn(item)` for each item as Ray tasks, yielded in input order."""
        ray, width = self.ray, self.workers if workers is None else max(workers, 1)
        args = ray.put(initargs)  # once into the object store, not once per task
        key, marker = uuid.uuid4().hex, os.environ.get(KILL_ONCE_ENV, "")
        call = self._remote.options(num_returns=1)
        source = iter(items)
        pending: deque[Any] = deque()  # refs in input order, not yet yielded
        running: set[Any] = set()  # refs not yet finished
        exhausted = False
        try:
            while True:
                while not exhausted and len(running) < width and len(pending) < 4 * width:
                    item = next(source, _END)
                    if item is _END:
                        exhausted = True
                        break
                    ref = call.remote(fn, init, args, key, marker, item)
                    pending.append(ref)
                    running.add(ref)
                if not pending:
                    return
                if pending[0] in running:
                    done, _ = ray.wait(list(running), num_returns=1)
                    running.difference_update(done)
                    continue
                out = ray.get(pending.popleft())
                if isinstance(out, _Failed):
                    raise UsageError(out.message)
                yield out
        finally:
            for ref in running:
                ray.cancel(ref, force=True)


_END = object()


def _check_address(address: str) -> None:
    """A HOST:PORT that nothing answers on is one line now, not minutes of Ray retrying."""
    if address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(
            f"engine.address={address!r}: expected auto, local, HOST:PORT or ray://HOST:PORT"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise UsageError(
            f"engine.address={address!r}: no Ray cluster answers there ({e.strerror or e})"
        ) from None


@contextmanager
def open_engine(cfg: EngineConfig, workers: int) -> Iterator[LocalEngine | RayEngine]:
    """The engine `cfg` names; a Ray runtime this call started is shut down at the end.

    Joins an initialized Ray runtime as it is (tests share one), else `ray.init` at
    `cfg.address` ("auto": a running cluster if there is one, else a new local Ray).
    """
    if cfg.kind == "local":
        yield LocalEngine(workers)
        return
    ray = import_ray()
    _check_address(cfg.address)
    started = False
    if not ray.is_initialized():
        address = None if cfg.address == "auto" else cfg.address
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise UsageError(f"engine.address={cfg.address!r}: cannot join Ray ({e})") from e
        started = True
    try:
        yield RayEngine(ray, workers)
    finally:
        if started:
            ray.shutdown()
