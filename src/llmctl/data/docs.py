"""Documents in and out: every input format a data stage reads, and the `docs` shard format.

Every input file is opened by `open_input` (regular files only, through `files.open_regular`;
decompressed by suffix); file names are recorded as `files.display` shows them.
Reading is split in two so it parallelizes deterministically: `iter_raw` (main process)
streams raw records with their file:line, `parse_raw` (any worker) turns one into a `Doc` or
a `BadRecord`. Inputs: `.txt` (one doc per file, or per paragraph), `.jsonl` / `.jsonl.gz` /
`.jsonl.zst`, `.parquet`, `.html`, `.warc` / `.warc.gz`, folders of these, and `docs`
artifacts. Output shards are `shard-NNNNN.jsonl.gz` written with a fixed gzip header so that
the same documents give the same bytes.

Example:
    opts = ReadOptions(text_field="content")
    for raw in iter_raw(resolve_inputs([Path("data/")]), opts):
        doc = parse_raw(raw, opts) if isinstance(raw, Raw) else raw
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmctl.artifacts import is_artifact, open_artifact
from llmctl.config import helpful
from llmctl.errors import UsageError
from llmctl.files import check_regular, display, open_regular

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".ndjson")
WARC_SUFFIXES = (".warc", ".warc.gz")
SUFFIXES = (*JSONL_SUFFIXES, *WARC_SUFFIXES, ".txt", ".parquet", ".html", ".htm")
SHARD_GLOB = "shard-*.jsonl.gz"
EXCERPT_CHARS = 200


@dataclass(frozen=True)
class ReadOptions:
    """How raw inputs are read; data-stage configs inherit these keys."""

    text_field: str = helpful("text", "JSON/parquet field that holds the document text")
    txt_split: Literal["file", "paragraph"] = helpful(
        "file", ".txt inputs: one document per file, or one per blank-line-separated paragraph"
    )
    max_line_bytes: int = helpful(
        16 * 1024 * 1024, "longer JSONL lines are skipped as malformed (bounds memory)"
    )
    strict: bool = helpful(False, "fail at the first malformed record instead of skipping it")


@dataclass(slots=True)
class Doc:
    """One document: a stable id, its text, where it came from, and any metadata."""

    id: str
    text: str
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        return {"id": self.id, "text": self.text, "source": self.source, **self.meta}


@dataclass(slots=True)
class BadRecord:
    """A malformed input record, kept with its location so nothing is silently lost."""

    file: str
    line: int
    reason: str
    excerpt: str = ""

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def to_record(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "line": self.line,
            "reason": self.reason,
            "excerpt": self.excerpt,
        }

    def message(self) -> str:
        """The one-line error `--strict` stops with: where, why, and the excerpt if any."""
        return f"{self.where}: {self.reason}" + (f": {self.excerpt}" if self.excerpt else "")


def keep_aside(bad: BadRecord, rejected: list[BadRecord], counts: dict[str, int],
               strict: bool) -> None:  # fmt: skip
    """Keep a malformed record in `rejected` and count it under its reason in `counts`; with
    `strict`, stop instead with its one-line UsageError."""
    if strict:
        raise UsageError(bad.message())
    rejected.append(bad)
    counts[bad.reason] = counts.get(bad.reason, 0) + 1


@dataclass(slots=True)
class Raw:
    """An unparsed record: `kind` says how `parse_raw` turns `payload` into a Doc."""

    file: str
    line: int
    kind: Literal["json", "text", "html", "record"]
    payload: Any
    url: str | None = None


def _has_suffix(path: Path, suffixes: Iterable[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _walk_inputs(root: Path) -> list[Path]:
    """Supported files under `root`, sorted, hidden entries skipped. os.walk, unlike
    Path.rglob (which silently skips folders it cannot list), lets us fail on them. A FIFO,
    device or socket with a supported name is refused (check_regular), not skipped."""

    def unreadable(e: OSError) -> None:
        raise UsageError(f"{display(e.filename or root)}: folder is not readable ({e.strerror})")

    found = []
    for folder, dirs, names in os.walk(root, onerror=unreadable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(folder, n) for n in names if not n.startswith(".")]
    files = sorted(f for f in found if _has_suffix(f, SUFFIXES) and not f.is_dir())
    for f in files:
        check_regular(f, "input file")
    return files


def resolve_inputs(paths: Iterable[Path | str]) -> list[Path]:
    """Expand folders (sorted, hidden entries skipped) and check every input exists.

    A `docs` artifact directory stays one input. Raises UsageError for a missing path, an
    unsupported file given explicitly, a special file (FIFO, device, socket), an unreadable
    file or folder, or an empty input set.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UsageError(f"{display(p)}: no such file or directory")
        if p.is_dir():
            if is_artifact(p):
                out.append(p)
                continue
            out.extend(_walk_inputs(p))
        elif _has_suffix(p, SUFFIXES):
            check_regular(p, "input file")
            out.append(p)
        else:
            raise UsageError(
                f"{display(p)}: unsupported input type (expected one of {', '.join(SUFFIXES)})"
            )
    if not out:
        raise UsageError("no input documents: the given paths hold no supported files")
    return out


def open_input(path: Path) -> io.BufferedIOBase:
    """The one way an input file is opened: a regular file only (a FIFO, device or socket is
    refused before it is read, so nothing blocks), decompressed by its suffix (.gz, .zst)."""
    f = open_regular(path, "input file")
    name = path.name.lower()
    if name.endswith(".gz"):
        return _gunzip(f)
    if name.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(f))
    return f  # type: ignore[return-value]


def _gunzip(f: io.BufferedIOBase) -> gzip.GzipFile:
    g = gzip.GzipFile(fileobj=f, mode="rb")
    g.myfileobj = f  # type: ignore[attr-defined]  # so that closing g closes f, as gzip.open does
    return g


class _ZstdReader(io.RawIOBase):
    """A .zst stream, frame after frame. A stream cut inside a frame raises EOFError at the cut
    (zstandard's stream_reader would just end there, and the cut would go unnoticed); damaged
    data raises OSError. Both end the file as a `truncated_file` record, as gzip does."""

    def __init__(self, f: io.BufferedIOBase) -> None:
        import zstandard

        self._f, self._zstd = f, zstandard
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False
        self._buf, self._pos = b"", 0

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        chunk = self._f.read(1 << 16)
        if not chunk:
            if self._in_frame:
                raise EOFError("zstd stream ended inside a frame (cut short)")
            return False
        out = []
        try:
            while chunk:
                if self._d.eof:  # the next frame of a multi-frame file
                    self._d = self._zstd.ZstdDecompressor().decompressobj()
                out.append(self._d.decompress(chunk))
                chunk = self._d.unused_data if self._d.eof else b""
        except self._zstd.ZstdError as e:
            raise OSError(f"damaged zstd stream ({e})") from None
        self._in_frame = not self._d.eof
        self._buf, self._pos = b"".join(out), 0
        return True

    def readinto(self, b: Any) -> int:
        while self._pos >= len(self._buf):
            if not self._fill():
                return 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


_TRUNCATED = (EOFError, gzip.BadGzipFile, zlib.error, OSError)


def _iter_lines(path: Path, opts: ReadOptions) -> Iterator[Raw | BadRecord]:
    """JSONL lines as raw bytes; over-long lines and truncated compression become BadRecords."""
    name = display(path)
    n = 0
    try:
        with open_input(path) as f:
            while True:
                line = f.readline(opts.max_line_bytes + 1)
                if not line:
                    break
                n += 1
                if len(line) > opts.max_line_bytes and not line.endswith(b"\n"):
                    while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass  # skip the remainder without holding it in memory
                    yield BadRecord(
                        name, n, "line_too_long", line[:EXCERPT_CHARS].decode("utf-8", "replace")
                    )
                    continue
                if line.strip():
                    yield Raw(name, n, "json", line)
    except _TRUNCATED as e:
        yield BadRecord(name, n + 1, "truncated_file", f"{type(e).__name__}: {e}"[:EXCERPT_CHARS])
        return
    if n == 0:
        yield BadRecord(name, 0, "empty_file")


def _read_all(path: Path) -> bytes:
    with open_input(path) as f:
        return f.read()


def _iter_txt(path: Path, opts: ReadOptions) -> Iterator[Raw | BadRecord]:
    data, name = _read_all(path), display(path)
    if not data.strip():
        yield BadRecord(name, 0, "empty_file")
        return
    if opts.txt_split == "file":
        yield Raw(name, 1, "text", data)
        return
    # Paragraphs: split on blank lines, numbered by the line each starts on.
    line = 1
    for block in re.split(rb"(\n(?:[ \t\r]*\n)+)", data):  # one or more blank lines
        if block.strip():
            yield Raw(name, line + (len(block) - len(block.lstrip(b"\n"))), "text", block)
        line += block.count(b"\n")


def _iter_parquet(path: Path, opts: ReadOptions) -> Iterator[Raw | BadRecord]:
    import pyarrow.parquet as pq

    name = display(path)
    with open_input(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow raises several types for a damaged file
            yield BadRecord(name, 0, "unreadable_parquet", str(e)[:EXCERPT_CHARS])
            return
        n = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                n += 1
                yield Raw(name, n, "record", row)
    if n == 0:
        yield BadRecord(name, 0, "empty_file")


def _iter_warc(path: Path) -> Iterator[Raw | BadRecord]:
    from llmctl.data.web import iter_warc

    n, name = 0, display(path)
    with open_regular(path, "input file") as f:  # raw: warcio reads per-record gzip itself
        try:
            for n, url, html in iter_warc(f):
                yield Raw(name, n, "html", html, url=url)
        except Exception as e:  # warcio raises generic errors on damaged archives
            yield BadRecord(name, n + 1, "truncated_file", f"{type(e).__name__}: {e}"[:200])


def _docs_shards(path: Path) -> Iterator[tuple[str, io.BufferedIOBase]]:
    """(name, open stream) of each shard a docs artifact lists. Its files passed the manifest
    check, so a shard that does not decompress is a damaged artifact: UsageError, not a record."""
    m = open_artifact(path, "docs")
    for shard in m.listed(SHARD_GLOB):
        yield display(shard), _gunzip(open_regular(shard))


def _iter_artifact(path: Path) -> Iterator[Raw | BadRecord]:
    for name, stream in _docs_shards(path):
        with stream as f:
            try:
                for n, line in enumerate(f, start=1):
                    yield Raw(name, n, "json", line)
            except _TRUNCATED as e:
                raise UsageError(f"{name}: damaged docs shard ({type(e).__name__}: {e})") from None


def iter_raw(files: list[Path], opts: ReadOptions) -> Iterator[Raw | BadRecord]:
    """Stream raw records from resolved inputs, in input order. Memory stays bounded."""
    for path in files:
        if path.is_dir():
            yield from _iter_artifact(path)
        elif _has_suffix(path, JSONL_SUFFIXES):
            yield from _iter_lines(path, opts)
        elif _has_suffix(path, WARC_SUFFIXES):
            yield from _iter_warc(path)
        elif _has_suffix(path, (".parquet",)):
            yield from _iter_parquet(path, opts)
        elif _has_suffix(path, (".html", ".htm")):
            data = _read_all(path)
            yield (
                Raw(display(path), 1, "html", data)
                if data.strip()
                else BadRecord(display(path), 0, "empty_file")
            )
        else:
            yield from _iter_txt(path, opts)


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _to_json(record: dict[str, Any]) -> str:
    """A record as one JSON line's text; values JSON has no type for (parquet timestamps,
    decimals, bytes) become their str()."""
    return json.dumps(record, ensure_ascii=False, default=str)


def load_json_line(raw: Raw) -> Any:
    """The JSON value of one `json` Raw record, or a BadRecord saying why it has none."""
    try:
        return json.loads(raw.payload.decode("utf-8"))
    except UnicodeDecodeError as e:
        return BadRecord(raw.file, raw.line, "invalid_utf8", str(e)[:EXCERPT_CHARS])
    except json.JSONDecodeError as e:
        excerpt = raw.payload[:EXCERPT_CHARS].decode("utf-8", "replace")
        return BadRecord(raw.file, raw.line, "bad_json", f"{e.msg}: {excerpt}")
    except (RecursionError, ValueError) as e:
        # Valid syntax the decoder still refuses: nesting deeper than its recursion limit
        # ("[[[[..." in one short line), an integer of more than 4,300 digits.
        what = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
        excerpt = raw.payload[:EXCERPT_CHARS].decode("utf-8", "replace")
        return BadRecord(raw.file, raw.line, "bad_json", f"{what}: {excerpt}")


# Fields that are ours and must not be copied from an input record into `meta`.
_OWN = {"id", "text", "source"}


def parse_raw(raw: Raw, opts: ReadOptions) -> Doc | BadRecord:
    """Turn one raw record into a Doc, or a BadRecord naming what is wrong with it."""
    where_id = f"{raw.file}:{raw.line}"
    if raw.kind == "text":
        try:
            text = raw.payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return BadRecord(raw.file, raw.line, "invalid_utf8", str(e)[:EXCERPT_CHARS])
        return Doc(where_id, text.lstrip("\ufeff"), raw.file)
    if raw.kind == "html":
        from llmctl.data.web import html_to_text

        text = html_to_text(raw.payload, raw.url)
        if not text:
            return BadRecord(raw.file, raw.line, "no_main_text", raw.url or "")
        return Doc(raw.url or where_id, text, raw.file, {"url": raw.url} if raw.url else {})
    if raw.kind == "json":
        rec = load_json_line(raw)
        if isinstance(rec, BadRecord):
            return rec
    else:
        rec = raw.payload
    if not isinstance(rec, dict):
        return BadRecord(raw.file, raw.line, "not_an_object", repr(rec)[:EXCERPT_CHARS])
    if opts.text_field not in rec:
        return BadRecord(raw.file, raw.line, "missing_text", f"no field '{opts.text_field}'")
    text = rec[opts.text_field]
    if not isinstance(text, str):
        return BadRecord(raw.file, raw.line, "text_not_string", f"{type(text).__name__}")
    if not _valid_text(text):
        return BadRecord(
            raw.file,
            raw.line,
            "lone_surrogate",
            text[:EXCERPT_CHARS].encode("utf-8", "replace").decode(),
        )
    # Stages write the other fields back out as UTF-8 JSON: a lone surrogate in any of them
    # (a key too) would fail there, far from this line.
    rest = {k: v for k, v in rec.items() if k != opts.text_field}
    if rest and not _valid_text(_to_json(rest)):
        bad = [k for k, v in rest.items() if not _valid_text(_to_json({k: v}))]
        where = f"in field(s) {', '.join(bad)}"[:EXCERPT_CHARS]
        return BadRecord(
            raw.file, raw.line, "lone_surrogate", where.encode("utf-8", "replace").decode()
        )
    doc_id = rec.get("id")
    if not isinstance(doc_id, str | int) or isinstance(doc_id, bool) or doc_id == "":
        doc_id = where_id
    source = rec.get("source") if isinstance(rec.get("source"), str) else raw.file
    meta = {k: v for k, v in rec.items() if k not in _OWN and k != opts.text_field}
    return Doc(str(doc_id), text, source, meta)


class ShardWriter:
    """JSONL records into `PREFIX-NNNNN.jsonl.gz` files of at most `shard_bytes` (uncompressed).

    The gzip header carries no file name or time, so equal records give equal bytes.
    At least one shard is always written, so readers find a fixed file set.
    """

    def __init__(self, dir: Path, prefix: str = "shard", shard_bytes: int = 128 << 20) -> None:
        self.dir, self.prefix, self.shard_bytes = Path(dir), prefix, shard_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self.names: list[str] = []
        self.count = 0
        self._f: gzip.GzipFile | None = None
        self._size = 0
        self._open()

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.names):05d}.jsonl.gz"
        self.names.append(name)
        raw = open(self.dir / name, "wb")  # noqa: SIM115 (closed in _close_current)
        self._f = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=5)
        self._raw = raw
        self._size = 0

    def write(self, record: dict[str, Any]) -> None:
        line = (_to_json(record) + "\n").encode("utf-8")
        if self._size and self._size + len(line) > self.shard_bytes:
            self._close_current()
            self._open()
        assert self._f is not None
        self._f.write(line)
        self._size += len(line)
        self.count += 1

    def _close_current(self) -> None:
        if self._f is not None:
            self._f.close()
            self._raw.close()
            self._f = None

    def close(self) -> list[str]:
        self._close_current()
        return self.names

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ErrorLog:
    """`rejected/errors.jsonl`: every malformed record with file, line and reason."""

    def __init__(self, path: Path, strict: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close)
        self.strict = strict
        self.counts: dict[str, int] = {}

    def add(self, bad: BadRecord) -> None:
        if self.strict:
            raise UsageError(bad.message())
        self.counts[bad.reason] = self.counts.get(bad.reason, 0) + 1
        self._f.write(json.dumps(bad.to_record(), ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> ErrorLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_docs(paths: Iterable[Path | str], opts: ReadOptions) -> Iterator[Doc | BadRecord]:
    """Serial convenience: resolved inputs to Docs and BadRecords, in order."""
    for raw in iter_raw(resolve_inputs(paths), opts):
        yield parse_raw(raw, opts) if isinstance(raw, Raw) else raw


def read_docs_artifact(path: Path) -> Iterator[dict[str, Any]]:
    """The records of a `docs` artifact, in shard order (for later stages and tests)."""
    for name, stream in _docs_shards(path):
        with stream as f:
            try:
                for n, line in enumerate(f, start=1):
                    try:
                        yield json.loads(line)
                    except ValueError as e:  # a verified shard holds only what clean wrote
                        raise UsageError(f"{name}:{n}: damaged docs shard ({e})") from None
            except _TRUNCATED as e:
                raise UsageError(f"{name}: damaged docs shard ({type(e).__name__}: {e})") from None


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of at most `size` items."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
