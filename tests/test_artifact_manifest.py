"""artifacts.py's manifest, field by field: what publish writes (inputs by digest or size,
timestamps), what open_artifact refuses (each malformed field, each unsafe file name), and
what --force leaves behind (nothing)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from llmctl.artifacts import building, open_artifact
from llmctl.errors import UsageError


def make(out: Path, **kw: object) -> Path:
    with building(out, kind="docs", command="test", config={"a": 1}, **kw) as art:  # type: ignore[arg-type]
        (art.dir / "shard-00001.jsonl").write_bytes(b"two")
        (art.dir / "shard-00000.jsonl").write_bytes(b"one")
        (art.dir / "notes.txt").write_text("n")
    return out


def edit(out: Path, **fields: object) -> None:
    m = json.loads((out / "manifest.json").read_text())
    m.update(fields)
    (out / "manifest.json").write_text(json.dumps(m))


def test_manifest_records_inputs_timestamps_and_lists_files_in_order(tmp_path: Path) -> None:
    first = make(tmp_path / "first")
    loose = tmp_path / "loose.txt"
    loose.write_text("12345")
    out = make(tmp_path / "second", inputs={"docs": first, "extra": loose})
    m = open_artifact(out, "docs")
    digest = open_artifact(first, "docs").digest
    assert m.data["inputs"]["docs"] == {"path": str(first), "kind": "docs", "digest": digest}
    sha = hashlib.sha256(b"12345").hexdigest()
    want = {"path": str(loose), "kind": "file", "bytes": 5, "sha256": sha}
    assert m.data["inputs"]["extra"] == want
    assert set(m.data) >= {"created", "duration_s", "command", "llmctl_version"}
    assert m.data["created"].endswith("+00:00") and m.data["duration_s"] >= 0
    assert m.listed("shard-*") == [out / "shard-00000.jsonl", out / "shard-00001.jsonl"]
    files = json.dumps(m.files, sort_keys=True).encode()
    assert m.digest == hashlib.sha256(files).hexdigest()
    listed = make(tmp_path / "third", inputs=[loose]).joinpath("manifest.json").read_text()
    assert json.loads(listed)["inputs"] == {"input-0": want}


def test_duration_counts_from_when_the_command_started(tmp_path: Path) -> None:
    """eval and generate compute first and publish at the end: `started` makes duration_s
    the command's time, not the few milliseconds of writing the files."""
    with building(tmp_path / "e", kind="eval", command="eval", config={},
                  started=time.time() - 7.5) as art:  # fmt: skip
        (art.dir / "eval.json").write_text("{}")
    assert 7.5 <= open_artifact(tmp_path / "e", "eval").data["duration_s"] < 60


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"digest": None}, "manifest has no digest"),
        ({"digest": 5}, "manifest has no digest"),
        ({"config": []}, "manifest field 'config' is not an object"),
        ({"stats": "x"}, "manifest field 'stats' is not an object"),
        ({"inputs": 1}, "manifest field 'inputs' is not an object"),
        ({"files": []}, "manifest field 'files' is not an object"),
        ({"kind": "nope"}, "unknown artifact kind 'nope'"),
        ({"schema": "1"}, "unknown manifest schema '1'"),
    ],
)
def test_malformed_manifest_fields_are_refused(tmp_path: Path, fields: dict, message: str) -> None:
    out = make(tmp_path / "a")
    edit(out, **fields)
    with pytest.raises(UsageError, match=message):
        open_artifact(out, "docs")


GOOD = {"bytes": 3, "sha256": hashlib.sha256(b"one").hexdigest()}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "is not a plain relative file name"),
        ("a\\b", "is not a plain relative file name"),
        ("a\0b", "is not a plain relative file name"),
        ("/etc/passwd", "points outside the artifact"),
        ("../x", "points outside the artifact"),
        ("a/../../x", "points outside the artifact"),
        ("./shard-00000.jsonl", "points outside the artifact"),
        ("sub/./shard-00000.jsonl", "points outside the artifact"),
    ],
)
def test_unsafe_file_names_are_refused(tmp_path: Path, name: str, message: str) -> None:
    out = make(tmp_path / "a")
    edit(out, files={name: GOOD})
    with pytest.raises(UsageError, match=message):
        open_artifact(out, "docs")


@pytest.mark.parametrize(
    "meta",
    [{"bytes": -1, "sha256": GOOD["sha256"]}, {"bytes": 3.0, "sha256": GOOD["sha256"]},
     {"bytes": 3, "sha256": "ab"}, {"bytes": 3}, "x"],
)  # fmt: skip
def test_file_entries_need_bytes_and_sha256(tmp_path: Path, meta: object) -> None:
    out = make(tmp_path / "a")
    edit(out, files={"shard-00000.jsonl": meta})
    with pytest.raises(UsageError, match="needs bytes and sha256"):
        open_artifact(out, "docs")


def test_force_replaces_and_leaves_no_old_copy(tmp_path: Path) -> None:
    out = make(tmp_path / "a")
    old = open_artifact(out, "docs").data["created"]
    make(out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert open_artifact(out, "docs").data["created"] >= old


def test_an_oversized_manifest_is_not_read(tmp_path: Path) -> None:
    out = make(tmp_path / "a")
    with open(out / "manifest.json", "r+b") as f:  # 64 MiB + 1: a sparse file, instant
        f.truncate((64 << 20) + 1)
    with pytest.raises(UsageError, match=r"manifest larger than 67,108,864 bytes; not read"):
        open_artifact(out, "docs")
