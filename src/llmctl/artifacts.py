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

import fnmatch
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from llmctl import __version__
from llmctl.errors import UsageError
from llmctl.files import MAX_JSON_BYTES, check_regular, display, open_regular, read_json

SCHEMA = 1
MANIFEST = "manifest.json"
KINDS = ("docs", "tokens", "checkpoint", "adapter", "samples", "export", "eval", "report")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a regular file, read in 1 MiB chunks (UsageError for a special file)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
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

    def listed(self, pattern: str) -> list[Path]:
        """The manifest's files whose names match the glob `pattern`, in name order: readers
        take their files from here, never from the directory (an unlisted file is not read)."""
        return [self.path / n for n in sorted(self.files) if fnmatch.fnmatchcase(n, pattern)]


def is_artifact(path: Path) -> bool:
    """True when `path` is a directory holding a manifest entry (not yet verified: a manifest
    that is a dangling link or a FIFO still makes it an artifact, which `open_artifact` refuses,
    instead of a folder of loose inputs)."""
    return Path(path).is_dir() and os.path.lexists(Path(path) / MANIFEST)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def member(root: Path, name: object, where: str) -> Path:
    """The path of a manifest `files` entry inside the artifact `root`; UsageError unless the
    name is relative, free of `..`, and resolves (symlinks included) inside `root`."""
    if not isinstance(name, str) or not name or "\0" in name or "\\" in name:
        raise UsageError(f"{where}: files entry {name!r} is not a plain relative file name")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or ".." in parts or "." in name.split("/"):
        raise UsageError(f"{where}: files entry {display(name)!r} points outside the artifact")
    path = root / name
    real, top = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, top]) != top or real == top:
        raise UsageError(
            f"{display(path)}: resolves outside the artifact (to {display(real)}); not read"
        )
    return path


def _check_manifest(mpath: Path, data: object, kinds: tuple[str, ...]) -> dict[str, Any]:
    """The manifest's own fields, by type, before any of them is used."""
    where = display(mpath)
    if not isinstance(data, dict):
        raise UsageError(f"{where}: manifest is not a JSON object")
    schema = data.get("schema")
    if type(schema) is not int or schema != SCHEMA:
        raise UsageError(f"{where}: unknown manifest schema {schema!r} (expected {SCHEMA})")
    kind = data.get("kind")
    if kind not in KINDS:
        raise UsageError(f"{where}: unknown artifact kind {kind!r}")
    if kind not in kinds:
        raise UsageError(
            f"{display(mpath.parent)}: is a {kind!r} artifact, expected {' or '.join(kinds)}"
        )
    if not isinstance(data.get("digest"), str):
        raise UsageError(f"{where}: manifest has no digest")
    for key in ("config", "stats", "inputs"):
        if not isinstance(data.get(key, {}), dict):
            raise UsageError(f"{where}: manifest field {key!r} is not an object")
    files = data.get("files")
    if not isinstance(files, dict):
        raise UsageError(f"{where}: manifest field 'files' is not an object")
    for name, meta in files.items():
        ok = (
            isinstance(meta, dict)
            and type(meta.get("bytes")) is int
            and meta["bytes"] >= 0
            and isinstance(meta.get("sha256"), str)
            and _SHA256.fullmatch(meta["sha256"])
        )
        if not ok:
            raise UsageError(f"{where}: files entry {display(name)!r} needs bytes and sha256")
    return data


def open_artifact(path: Path | str, kind: str | tuple[str, ...], verify: bool = True) -> Manifest:
    """Open a published artifact of the given kind(s), checking its files against the manifest.

    Raises UsageError (one line, naming the path) for a missing or incomplete directory; a
    manifest that is not a regular file, not UTF-8 JSON, not an object, of an unknown schema
    or kind; a `files` entry that is absolute, holds `..` or resolves outside the artifact; a
    listed file that is missing, special (FIFO, device, socket) or of another size; and, with
    `verify`, a sha256 that differs. Nothing but the manifest is read before these checks pass.
    """
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    want = " or ".join(kinds)
    if not path.exists():
        raise UsageError(f"{display(path)}: no such artifact (expected a {want} directory)")
    mpath = path / MANIFEST
    if not is_artifact(path):
        raise UsageError(f"{display(path)}: not a complete artifact (no {MANIFEST}); rebuild it")
    data = _check_manifest(mpath, read_json(mpath, "manifest", MAX_JSON_BYTES), kinds)
    checked = []
    for name, meta in data["files"].items():
        fpath = member(path, name, display(mpath))
        if not os.path.lexists(fpath):
            raise UsageError(f"{display(fpath)}: listed in the manifest but missing")
        size = check_regular(fpath, "artifact file").st_size
        if size != meta["bytes"]:
            raise UsageError(
                f"{display(fpath)}: size differs from the manifest ({size:,} bytes, manifest "
                f"says {meta['bytes']:,}): truncated or edited"
            )
        checked.append((fpath, meta["sha256"]))
    if verify:
        for fpath, sha in checked:
            if sha256_file(fpath) != sha:
                raise UsageError(
                    f"{display(fpath)}: sha256 differs from the manifest (corrupted or edited)"
                )
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
        digest = files_digest(files)
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


def files_digest(files: dict[str, dict[str, Any]]) -> str:
    """The digest of a `files` table ({name: {bytes, sha256}}): a manifest's `digest`, and a
    raw folder's in an input ref, so `llmctl lineage` can recompute and compare both."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def raw_ref(path: Path) -> dict[str, Any]:
    """Size and sha256 of a raw input file, or for a folder the digest of its regular files'
    table (as `files_digest`); {} for what cannot be read: the command's own reader reports
    that with its own words, and lineage shows the link as unverifiable instead of trusted."""
    try:
        if path.is_file():
            return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        if path.is_dir():
            files = {}
            for p in sorted(path.rglob("*")):
                if p.is_file() and not p.is_symlink():
                    rel = p.relative_to(path).as_posix()
                    files[rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            size = sum(f["bytes"] for f in files.values())
            return {"files": len(files), "bytes": size, "digest": files_digest(files)}
    except (OSError, UsageError):
        pass
    return {}


def input_ref(path: Path) -> dict[str, Any]:
    """How a manifest names one input: an artifact by kind and digest, a raw file by size and
    sha256, a raw folder by the digest of its files (`raw_ref`). An input artifact's manifest
    is checked as `open_artifact` does (not its files' hashes)."""
    path = Path(path)
    if is_artifact(path):
        m = open_artifact(path, KINDS, verify=False)
        return {"path": display(path), "kind": m.kind, "digest": m.digest}
    return {"path": display(path), "kind": "file", **raw_ref(path)}


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
    started: float | None = None,
) -> Iterator[Builder]:
    """Build an artifact in `.OUT.partial/` and publish it when the block ends without error.

    `inputs` names what the artifact was built from: a dict of named inputs (`{"tokens": p}`)
    or a list of positional ones, recorded as `input-0`, `input-1`, ...
    `resume=True` (training) keeps an existing partial directory, and keeps it on failure so
    that rerunning the same command continues; otherwise a failed build leaves nothing behind.
    `started` (a `time.time()`) is when the command began, for a command that computes first
    and writes its artifact at the end (eval, generate): the manifest's duration_s counts
    from it.
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
    # Input refs first: a bad input artifact is refused before anything is created.
    refs = {name: input_ref(Path(p)) for name, p in named.items()}
    tmp = partial_dir(out)
    if tmp.exists() and not resume:
        shutil.rmtree(tmp)
    tmp.mkdir(exist_ok=True)
    b = Builder(out=out, dir=tmp, kind=kind, command=command, config=config, inputs=refs)
    if started is not None:
        b.started = started
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
