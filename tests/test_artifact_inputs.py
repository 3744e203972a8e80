"""artifacts.py's raw input refs: a file by size and sha256, a folder by the digest of its
regular files' table (as a manifest's digest), something unreadable as {}."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llmctl.artifacts import files_digest, input_ref, raw_ref


def test_a_raw_folder_is_named_by_its_files_digest(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    (raw / "sub").mkdir(parents=True)
    (raw / "a.txt").write_bytes(b"abc")
    (raw / "sub" / "b.txt").write_bytes(b"hello")
    (raw / "link.txt").symlink_to(raw / "a.txt")  # links are left out
    table = {
        "a.txt": {"bytes": 3, "sha256": hashlib.sha256(b"abc").hexdigest()},
        "sub/b.txt": {"bytes": 5, "sha256": hashlib.sha256(b"hello").hexdigest()},
    }
    digest = hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()
    assert files_digest(table) == digest
    assert raw_ref(raw) == {"files": 2, "bytes": 8, "digest": digest}
    ref = input_ref(raw)
    assert ref["kind"] == "file" and ref["digest"] == digest and ref["bytes"] == 8


def test_a_raw_file_and_a_missing_path(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"12345")
    assert raw_ref(f) == {"bytes": 5, "sha256": hashlib.sha256(b"12345").hexdigest()}
    assert raw_ref(tmp_path / "missing") == {}
