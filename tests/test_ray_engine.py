"""`--engine ray`: clean, dedup and tokenize on a local Ray (2 CPUs) give the artifact that
`--engine local` gives, byte for byte, for any worker count and block size; a worker process
killed mid-task is retried with the same result; without Ray, one line names the extra.

One Ray runtime is shared by the module (its start-up takes seconds). The references are
built with `--engine local -j 1` (in-process: no fork of a process that runs Ray's threads);
the existing tests show the local output does not depend on the worker count.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.commands import dedup as dedup_cmd
from llmctl.data import dedup as dd
from llmctl.data import dedup_ray
from llmctl.data import engine as engine_mod

ray = pytest.importorskip("ray")
# Under `pytest -n 2 --dist loadgroup` (make test) every Ray test runs in one xdist worker, so
# one Ray runtime exists at a time on the 2-core machine.
pytestmark = pytest.mark.xdist_group("ray")

TESTS = Path(__file__).parent
WEB = TESTS / "data" / "web"
SHAKESPEARE = TESTS / "data" / "tinyshakespeare" / "input.txt"
C4 = TESTS / "data" / "dedup" / "c4_sample.jsonl"
# Manifest stats that measure the run (time, speed, worker count), not the data.
TIMING = {"workers", "seconds", "mb_per_s", "throughput", "encode_s", "encode_mb_s", "train_s",
          "peak_rss_mb"}  # fmt: skip


def cli(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, [*map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def build(*args: str | Path) -> Path:
    code, output = cli(*args, "--quiet")
    assert code == 0, output
    return Path(args[args.index("--out") + 1])


def untimed(stats: Any) -> Any:
    if isinstance(stats, dict):
        return {k: untimed(v) for k, v in stats.items() if k not in TIMING}
    return stats


def assert_same_artifact(local: Path, other: Path) -> None:
    """Every file byte-identical, and the manifest's files, digest and stats (timing aside)."""
    names = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(other).as_posix() for p in other.rglob("*") if p.is_file())
    for name in names:
        if name != "manifest.json":
            assert (local / name).read_bytes() == (other / name).read_bytes(), name
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (local, other))
    assert a["files"] == b["files"] and a["digest"] == b["digest"]
    assert untimed(a["stats"]) == untimed(b["stats"])
    assert b["config"]["engine"]["kind"] == "ray"


@pytest.fixture(scope="module")
def ray_cpus2() -> Iterator[None]:
    # address="local": a new Ray of our own even if a `ray start` cluster runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="warning")  # fmt: skip
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def web_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The web fixtures plus a file of malformed records (bad JSON, bad UTF-8, no text)."""
    inp = tmp_path_factory.mktemp("web")
    for name in ("c4_demo.jsonl", "cc_en_head-0091.jsonl"):
        shutil.copy(WEB / name, inp / name)
    (inp / "zz_bad.jsonl").write_bytes(
        b'{"text": "A fine first line of text that says nothing much at all."}\n'
        b"{not json\n"
        b'{"text": "caf\xe9 latin-1"}\n'
        b'{"title": "no text field"}\n'
    )
    return inp


@pytest.fixture(scope="module")
def dedup_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 C4 docs, 50 near copies (1% of words replaced), exact copies, one malformed line."""
    texts = [json.loads(line)["text"] for line in C4.read_text(encoding="utf-8").splitlines()]
    recs = [{"id": f"o{i}", "text": t} for i, t in enumerate(texts)]
    rng = random.Random(0)
    for k in range(50):
        words = texts[rng.randrange(len(texts))].split(" ")
        for _ in range(max(1, len(words) // 100)):
            words[rng.randrange(len(words))] = f"zz{rng.randrange(10**6)}"
        recs.append({"id": f"v{k}", "text": " ".join(words)})
    recs += [{"id": "x3", "text": texts[3].upper()}, {"id": "x5", "text": texts[5]}]
    path = tmp_path_factory.mktemp("dedup") / "docs.jsonl"
    lines = [json.dumps(r) for r in recs]
    lines.insert(17, '{"id": "broken", "text": ')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.slow
def test_clean_on_ray_is_byte_identical(ray_cpus2: None, web_input: Path, tmp_path: Path) -> None:
    local = build("clean", web_input, "--out", tmp_path / "local", "-j", "1")
    errors = (local / "rejected" / "errors.jsonl").read_text().splitlines()
    assert [json.loads(e)["reason"] for e in errors] == ["bad_json", "invalid_utf8", "missing_text"]
    for workers, block in (("1", "128"), ("2", "3")):
        out = tmp_path / f"ray-{workers}-{block}"
        build("clean", web_input, "--out", out, "--engine", "ray", "-j", workers,
              "--set", f"batch_docs={block}")  # fmt: skip
        assert_same_artifact(local, out)


@pytest.mark.slow
def test_dedup_on_ray_is_byte_identical(
    ray_cpus2: None, dedup_input: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = build("dedup", dedup_input, "--out", tmp_path / "local", "-j", "1")
    stats = json.loads((local / "manifest.json").read_text())["stats"]
    assert stats["near_removed"] >= 40 and stats["exact_removed"] == 2
    assert stats["bad_records"] == {"bad_json": 1}
    # Small blocks everywhere: several map tasks, more shuffle partitions than buckets need.
    monkeypatch.setattr(dedup_cmd, "BATCH_DOCS", 9)
    monkeypatch.setattr(dedup_ray, "BAND_BLOCK_DOCS", 13)
    for workers, per_cpu in (("2", 3), ("1", 1)):
        monkeypatch.setattr(dedup_ray, "PARTITIONS_PER_CPU", per_cpu)
        out = tmp_path / f"ray-{workers}"
        build("dedup", dedup_input, "--out", out, "--engine", "ray", "-j", workers)
        assert_same_artifact(local, out)


@pytest.mark.slow
def test_tokenize_on_ray_is_byte_identical(
    ray_cpus2: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ("--vocab-size", "512", "--set", "txt_split=paragraph", "--shard-tokens", "20000")
    local = build("tokenize", SHAKESPEARE, "--out", tmp_path / "local", "-j", "1", *args)
    monkeypatch.setattr("llmctl.data.corpus.BATCH_DOCS", 7)  # 49 blocks instead of 1
    out = build("tokenize", SHAKESPEARE, "--out", tmp_path / "ray", "--engine", "ray", *args)
    assert_same_artifact(local, out)


@pytest.mark.slow
def test_a_killed_worker_is_retried_with_the_same_output(
    ray_cpus2: None, dedup_input: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = build("dedup", dedup_input, "--out", tmp_path / "local", "-j", "1")
    marker = tmp_path / "killed"
    monkeypatch.setenv(engine_mod.KILL_ONCE_ENV, str(marker))
    monkeypatch.setattr(dedup_cmd, "BATCH_DOCS", 9)
    out = build("dedup", dedup_input, "--out", tmp_path / "ray", "--engine", "ray")
    assert marker.exists()  # a task's worker process did die, after computing its block
    assert_same_artifact(local, out)


def test_missing_ray_is_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    for verb, inp in (("clean", WEB / "c4_demo.jsonl"), ("dedup", C4), ("tokenize", C4)):
        code, output = cli(verb, inp, "--out", tmp_path / verb, "--engine", "ray")
        assert code == 2, output
        assert output.strip() == "error: --engine ray needs Ray: pip install 'llmctl[ray]'"
        assert not (tmp_path / verb).exists()


def test_an_address_nothing_answers_on_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", "nowhere"):
        code, output = cli("dedup", C4, "--out", tmp_path / "o", "--engine", "ray",
                           "--set", f"engine.address='{address}'")  # fmt: skip
        assert code == 2 and output.startswith(f"error: engine.address='{address}': "), output
    assert not (tmp_path / "o").exists()


def test_unknown_engine_is_a_usage_error(tmp_path: Path) -> None:
    code, output = cli("clean", WEB / "c4_demo.jsonl", "--out", tmp_path / "o", "--engine", "spark")
    assert code == 2 and "engine.kind" in output and "'ray'" in output


@pytest.mark.parametrize("parts", [1, 2, 5])
def test_partitioned_band_pairs_equal_lsh_edges(parts: int) -> None:
    """The Ray map/shuffle/reduce pairs (`band_entries`, `bucket_pairs`) are `lsh_edges`'."""
    rng = np.random.default_rng(parts)
    sig = rng.integers(0, 3, size=(300, 24), dtype=np.uint32)  # few values: full buckets
    sig[100:200] = sig[:100]
    sig[100:200, rng.integers(0, 24, 100)] += 7
    nodes = np.sort(rng.choice(300, size=250, replace=False))
    i, j = dd.lsh_edges(sig, 6, 4, nodes)
    want = (nodes[i].astype(np.uint64) << np.uint64(32)) | nodes[j].astype(np.uint64)
    blocks = [dd.band_entries(sig, nodes[s : s + 37], 6, 4, parts) for s in range(0, 250, 37)]
    got = np.unique(
        np.concatenate(
            [dd.bucket_pairs(np.concatenate([b[p] for b in blocks])) for p in range(parts)]
        )
    )
    assert len(want) > 500 and np.array_equal(got, want)
    ok, bad = dd.verify_packed(sig, got, 0.5, True)
    gi, gj, n = dd.near_pairs(sig, nodes, 6, 4, 0.5, True)
    assert n == len(ok) + len(bad) and np.array_equal(dd.unpack_pairs(ok)[0], gi)
    assert np.array_equal(dd.unpack_pairs(ok)[1], gj)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["clean", "dedup", "tokenize"])
def test_bad_input_on_ray_is_one_line_and_nothing_published(
    ray_cpus2: None, web_input: Path, tmp_path: Path, command: str
) -> None:
    """The bad-input table of docs/design.md holds with --engine ray: file and artifact faults
    are one line naming the file (exit 2), a record fault under --strict names file:line, and
    nothing is published (the record-level skip is in the byte-identical tests above)."""
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    art = tmp_path / "docs"
    art.mkdir()
    (art / "manifest.json").write_text("{")
    extra = ["--vocab-size", "300"] if command == "tokenize" else []
    cases = [
        ([fifo], str(fifo)),
        ([art], str(art / "manifest.json")),
        ([web_input / "zz_bad.jsonl", "--strict"], f"{web_input / 'zz_bad.jsonl'}:2"),
    ]
    for i, (args, named) in enumerate(cases):
        out = tmp_path / f"out{i}"
        code, output = cli(command, *args, "--out", out, "--engine", "ray", "-q", *extra)
        lines = output.strip().splitlines()
        assert code == 2 and len(lines) == 1 and named in lines[0], output
        assert "Traceback" not in output and not out.exists()
        assert not (tmp_path / f".out{i}.partial").exists()
