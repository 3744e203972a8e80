"""The artifact contract: complete or absent, verified on open, never half-published."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmctl.artifacts import building, open_artifact, partial_dir
from llmctl.errors import UsageError

DATA = Path(__file__).parent / "data" / "web"


def make(out: Path, kind: str = "docs", **kw: object) -> Path:
    with building(out, kind=kind, command="test", config={"a": 1}, **kw) as art:  # type: ignore[arg-type]
        (art.dir / "shard-00000.jsonl.gz").write_bytes(b"payload-1234")
        (art.dir / "rejected").mkdir()
        (art.dir / "rejected" / "errors.jsonl").write_text("")
        art.stats["kept"] = 1
    return out


def test_published_artifact_opens_and_lists_files(tmp_path: Path) -> None:
    m = open_artifact(make(tmp_path / "a"), "docs")
    assert set(m.files) == {"shard-00000.jsonl.gz", "rejected/errors.jsonl"}
    assert m.stats == {"kept": 1} and m.config == {"a": 1}
    assert not partial_dir(tmp_path / "a").exists()


def test_refuses_missing_manifest_wrong_kind_and_unknown_schema(tmp_path: Path) -> None:
    out = make(tmp_path / "a")
    with pytest.raises(UsageError, match="expected tokens"):
        open_artifact(out, "tokens")
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "schema": 99}))
    with pytest.raises(UsageError, match="unknown manifest schema 99"):
        open_artifact(out, "docs")
    (out / "manifest.json").unlink()
    with pytest.raises(UsageError, match="not a complete artifact"):
        open_artifact(out, "docs")
    with pytest.raises(UsageError, match="no such artifact"):
        open_artifact(tmp_path / "never", "docs")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p.write_bytes(b"payload-9999"), "sha256 differs"),  # same size, new bytes
        (lambda p: p.write_bytes(b"payload"), "size differs"),  # truncated
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_refuses_tampered_files(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    out = make(tmp_path / "a")
    edit(out / "shard-00000.jsonl.gz")
    with pytest.raises(UsageError, match=message):
        open_artifact(out, "docs")
    if message == "sha256 differs":
        open_artifact(out, "docs", verify=False)  # only hashing, which reads every byte, is skipped
    else:
        with pytest.raises(UsageError, match=message):  # a stat is cheap: always checked
            open_artifact(out, "docs", verify=False)


def test_existing_out_needs_force(tmp_path: Path) -> None:
    out = make(tmp_path / "a")
    with pytest.raises(UsageError, match="--force"):
        make(out)
    make(out, force=True)
    open_artifact(out, "docs")


def test_exception_mid_write_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "a"
    with pytest.raises(RuntimeError), building(out, kind="docs", command="t", config={}) as art:
        (art.dir / "shard-00000.jsonl.gz").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert not out.exists() and not partial_dir(out).exists()
    old = make(tmp_path / "b")
    with (
        pytest.raises(RuntimeError),
        building(old, kind="docs", command="t", config={}, force=True),
    ):
        raise RuntimeError("boom")
    open_artifact(old, "docs")  # a failed --force rebuild keeps the old artifact intact


def enospc(*args: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_at_publish_leaves_nothing_and_keeps_the_old_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = make(tmp_path / "a")
    before = (old / "manifest.json").read_bytes()
    monkeypatch.setattr(os, "fsync", enospc)  # the manifest's fsync: the last write
    for out, force in ((tmp_path / "b", False), (old, True)):
        with pytest.raises(OSError) as e:
            make(out, force=force)
        assert e.value.filename == str(out)  # a failed write() names no file: the artifact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no partial or old dirs
    assert (old / "manifest.json").read_bytes() == before
    open_artifact(old, "docs")


def test_failed_final_rename_puts_the_old_artifact_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = make(tmp_path / "a")
    before = (out / "manifest.json").read_bytes()
    real = os.replace

    def replace(src: Path, dst: Path) -> None:
        if Path(src) == partial_dir(out):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        make(out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert (out / "manifest.json").read_bytes() == before
    open_artifact(out, "docs")


def test_disk_full_at_publish_keeps_training_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "ckpt"
    kw = {"kind": "checkpoint", "command": "t", "config": {}, "resume": True}
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(OSError), building(out, **kw) as art:  # type: ignore[arg-type]
        (art.dir / "_state").mkdir()
        (art.dir / "_state" / "state.json").write_text("{}")
        (art.dir / "model.safetensors").write_bytes(b"weights")
    assert (partial_dir(out) / "_state" / "state.json").read_text() == "{}"  # a rerun resumes
    monkeypatch.undo()
    with building(out, **kw) as art:  # type: ignore[arg-type]
        assert (art.dir / "_state" / "state.json").exists()
    assert sorted(open_artifact(out, "checkpoint").files) == ["model.safetensors"]
    assert not (out / "_state").exists() and not partial_dir(out).exists()


@pytest.mark.slow
def test_clean_killed_mid_write_leaves_no_artifact_and_rerun_succeeds(tmp_path: Path) -> None:
    lines = (DATA / "c4_demo.jsonl").read_bytes()
    big = tmp_path / "big.jsonl"
    big.write_bytes(lines * 150)  # ~7.5 MB: a few seconds of cleaning
    out = tmp_path / "docs"
    cmd = [
        sys.executable,
        "-m",
        "llmctl.cli",
        "clean",
        str(big),
        "--out",
        str(out),
        "-q",
        "-j",
        "1",
    ]
    proc = subprocess.Popen(cmd)
    shard = partial_dir(out) / "shard-00000.jsonl.gz"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (shard.exists() and shard.stat().st_size > 0):
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    with pytest.raises(UsageError):
        open_artifact(out, "docs")
    with pytest.raises(UsageError, match="not a complete artifact"):
        open_artifact(partial_dir(out), "docs")
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    m = open_artifact(out, "docs")
    assert m.stats["docs_in"] == 20 * 150
    assert not partial_dir(out).exists()
