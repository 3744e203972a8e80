"""The artifact contract: every stage writes one directory, complete or absent.

A stage builds into a hidden sibling `.NAME.partial/`, writes `manifest.json` last (file sizes
and sha256s, the resolved config, inputs, stats) and publishes with one `os.replace`. Readers
open artifacts only through `open_artifact`, which refuses anything incomplete or tampered with.

Example:
    with building(Path("out/docs"), kind="docs", command="clean", config=cfg) as art:
        (art.dir / "shard-00000.jsonl.gz").write_bytes(...)
        art.stats["kept"] = 10
    docs = open_artifact(Path("out/docs"), "docs")
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmctl import __version__
from llmctl.errors import UsageError

SCHEMA = 1
MANIFEST = "manifest.json"
KINDS = ("docs", "tokens", "checkpoint", "adapter", "samples", "export")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class Manifest:
    """A published artifact: its directory and the parsed `manifest.json`."""

    path: Path
    data: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.data["kind"]

    @property
    def config(self) -> dict[str, Any]:
        return self.data.get("config", {})

    @property
    def stats(self) -> dict[str, Any]:
        return self.data.get("stats", {})

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.data.get("files", {})

    @property
    def digest(self) -> str:
        return self.data["digest"]


def is_artifact(path: Path) -> bool:
    """True when `path` is a directory holding a manifest (not yet verified)."""
    return (Path(path) / MANIFEST).is_file()


def open_artifact(path: Path | str, kind: str | tuple[str, ...], verify: bool = True) -> Manifest:
    """Open a published artifact of the given kind(s), checking its files against the manifest.

    Raises UsageError (one line, naming the path) for a missing or incomplete directory, a wrong
    kind, an unknown schema, or a file whose size or sha256 differs from the manifest.
    """
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    want = " or ".join(kinds)
    if not path.exists():
        raise UsageError(f"{path}: no such artifact (expected a {want} directory)")
    mpath = path / MANIFEST
    if not path.is_dir() or not mpath.is_file():
        raise UsageError(f"{path}: not a complete artifact (no {MANIFEST}); rebuild it")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{mpath}: unreadable manifest: {e}") from e
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UsageError(f"{mpath}: unknown manifest schema {data.get('schema')!r}")
    if data.get("kind") not in kinds:
        raise UsageError(f"{path}: is a {data.get('kind')!r} artifact, expected {want}")
    if verify:
        for name, meta in data.get("files", {}).items():
            fpath = path / name
            if not fpath.is_file():
                raise UsageError(f"{fpath}: listed in the manifest but missing")
            if fpath.stat().st_size != meta["bytes"]:
                raise UsageError(f"{fpath}: size differs from the manifest (truncated or edited)")
            if sha256_file(fpath) != meta["sha256"]:
                raise UsageError(f"{fpath}: sha256 differs from the manifest (corrupted or edited)")
    return Manifest(path=path, data=data)


def partial_dir(out: Path) -> Path:
    """The hidden sibling an artifact is built in before it is published."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


@dataclass
class Builder:
    """An artifact under construction: write files into `dir`, fill `stats`."""

    out: Path
    dir: Path
    kind: str
    command: str
    config: dict[str, Any]
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def _files(self) -> dict[str, dict[str, Any]]:
        files = {}
        # A resumed build may hold the .tmp of a manifest whose write failed (disk full).
        own = (MANIFEST, MANIFEST + ".tmp")
        for p in sorted(self.dir.rglob("*")):
            rel = p.relative_to(self.dir).as_posix()
            if p.is_file() and rel not in own and not rel.startswith("_state/"):
                files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        return files

    def publish(self, force: bool) -> Manifest:
        """Write the manifest last, then move the directory into place in one rename."""
        files = self._files()
        digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        data = {
            "schema": SCHEMA,
            "kind": self.kind,
            "command": self.command,
            "llmctl_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.started, 3),
            "config": self.config,
            "inputs": self.inputs,
            "files": files,
            "stats": self.stats,
            "digest": digest,
        }
        tmp = self.dir / (MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / MANIFEST)
        # In-progress training state never ships. It goes only now, so that a failure while
        # writing the manifest (disk full) leaves a partial directory that still resumes.
        state = self.dir / "_state"
        if state.exists():
            shutil.rmtree(state)
        old = None
        if self.out.exists():
            if not force:
                raise UsageError(f"{self.out}: already exists (use --force to replace it)")
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        try:
            os.replace(self.dir, self.out)
        except BaseException:
            if old is not None:
                os.replace(old, self.out)  # the previous artifact goes back in place
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return Manifest(path=self.out, data=data)


def input_ref(path: Path) -> dict[str, Any]:
    """How a manifest names one input: an artifact by kind and digest, a file by size."""
    path = Path(path)
    if is_artifact(path):
        m = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        return {"path": str(path), "kind": m.get("kind"), "digest": m.get("digest")}
    ref: dict[str, Any] = {"path": str(path), "kind": "file"}
    if path.is_file():
        ref["bytes"] = path.stat().st_size
    return ref


@contextmanager
def building(
    out: Path | str,
    *,
    kind: str,
    command: str,
    config: dict[str, Any],
    inputs: dict[str, Path] | list[Path] | None = None,
    force: bool = False,
    resume: bool = False,
) -> Iterator[Builder]:
    """Build an artifact in `.OUT.partial/` and publish it when the block ends without error.

    `inputs` names what the artifact was built from: a dict of named inputs (`{"tokens": p}`)
    or a list of positional ones, recorded as `input-0`, `input-1`, ...
    `resume=True` (training) keeps an existing partial directory, and keeps it on failure so
    that rerunning the same command continues; otherwise a failed build leaves nothing behind.
    """
    assert kind in KINDS, kind
    out = Path(out)
    if out.exists() and not force:
        what = "an artifact" if is_artifact(out) else "a path that is not an artifact"
        raise UsageError(f"{out}: already exists ({what}); use --force to replace it")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    named = (
        dict(inputs or {})
        if not isinstance(inputs, list)
        else {f"input-{i}": p for i, p in enumerate(inputs)}
    )
    tmp = partial_dir(out)
    if tmp.exists() and not resume:
        shutil.rmtree(tmp)
    tmp.mkdir(exist_ok=True)
    b = Builder(
        out=out,
        dir=tmp,
        kind=kind,
        command=command,
        config=config,
        inputs={name: input_ref(Path(p)) for name, p in named.items()},
    )
    try:
        yield b
        b.publish(force=force)  # inside the try: a failed publish leaves nothing behind either
    except BaseException as e:
        if not resume:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None:
            # A failed write() (ENOSPC, EIO) names no file; say which artifact it was building.
            e.filename = str(out)
        raise
