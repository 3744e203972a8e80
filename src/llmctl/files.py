"""Opening files llmctl did not write: regular files only, one clear line for anything else.

Every input file (documents, prompts, configs) and every file of an artifact is opened here,
so the rules hold everywhere:
- only regular files are read: a named pipe, device or socket is refused from its `stat`,
  and opened with O_NONBLOCK and checked again with `fstat`, so a FIFO never blocks a command
  and `/dev/zero` is never read forever;
- a missing, unreadable or special file is a `UsageError` (exit 2) naming the file;
- small JSON files (manifests, `config.json`, `tokenizer_config.json`) are capped in size and
  must be UTF-8 JSON;
- file names that are not valid UTF-8 are kept (the OS hands them to Python with
  surrogateescape, so the file opens) and shown with their bad bytes as `\\xNN` by `display`,
  the text that goes into error lines, records and manifests.

Example:
    with open_regular(Path("data/a.jsonl")) as f:
        head = f.read(100)
    cfg = read_json(Path("ckpt/config.json"))
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, BinaryIO

from llmctl.errors import UsageError

MAX_JSON_BYTES = 64 << 20  # manifests and configs are kilobytes; this bounds a hostile one
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str) -> str:
    """`text` safe to print on one line and to write as UTF-8: bytes of a non-UTF-8 file name
    (lone surrogates from surrogateescape) become `\\xNN`, control characters their escape.

    >>> printable("caf\\udce9\\n.txt")
    'caf\\\\xe9\\\\n.txt'
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
        text = raw.decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate surrogateescape never makes (JSON's \ud800)
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def display(path: Path | str) -> str:
    """A path as printable text (see `printable`)."""
    return printable(os.fspath(path))


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def check_regular(path: Path | str, what: str = "file") -> os.stat_result:
    """The `stat` of `path` (symlinks followed) if it is a regular file; else UsageError."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"{display(path)}: no such {what}") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise UsageError(f"{display(path)}: cannot read {what} ({_why(e)})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(
            f"{display(path)}: {_kind(st.st_mode)}, not a regular file; llmctl reads only files"
        )
    return st


def _why(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def open_regular(path: Path | str, what: str = "file") -> BinaryIO:
    """Open a regular file for binary reading; UsageError for anything else (see module doc)."""
    check_regular(path, what)
    try:
        # O_NONBLOCK: if a FIFO replaced the file since the stat, open returns at once.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as e:
        raise UsageError(f"{display(path)}: cannot read {what} ({_why(e)})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError(f"{display(path)}: {_kind(st.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path | str, limit: int | None = None, what: str = "file") -> bytes:
    """All bytes of a regular file; UsageError if it is larger than `limit`."""
    with open_regular(path, what) as f:
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise UsageError(f"{display(path)}: {what} larger than {limit:,} bytes; not read")
    return data


def read_json(path: Path | str, what: str = "JSON file", limit: int = MAX_JSON_BYTES) -> Any:
    """The parsed contents of a small UTF-8 JSON file; UsageError naming the file when it is
    not a regular file, too large, not UTF-8 or not JSON."""
    data = read_bytes(path, limit, what)
    where = display(path)
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{where}: {what} is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise UsageError(
            f"{where}: {what} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno})"
        ) from None
    except (RecursionError, ValueError) as e:  # "[[[[..." deeper than the parser's recursion
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
        raise UsageError(f"{where}: {what} is not usable JSON ({why})") from None
