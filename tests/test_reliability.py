"""Hostile and broken inputs end to end (../shared/reference/reliability.md §2): damaged
weights and tampered checkpoints through `generate`, `eval`, `finetune` and `lora` (C3, C4, C6),
over-long JSONL lines in `clean` and `tokenize` (D6), records no stage may crash on (D8), and
a disk that fills up mid-write (B3). Every failure must be one line naming the file, never a
traceback."""

from __future__ import annotations

import errno
import gzip
import json
import os
import random
import shutil
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from llmctl.artifacts import building, open_artifact, partial_dir, sha256_file
from llmctl.cli import app
from llmctl.data import docs
from llmctl.data.docs import BadRecord, Doc, Raw, ReadOptions, iter_raw, parse_raw
from llmctl.model.gpt import GPT, preset
from llmctl.model.io import save_checkpoint
from llmctl.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
PARAS = [p for p in DATA.read_text(encoding="utf-8").split("\n\n") if p.strip()]
WEB = Path(__file__).parent / "data" / "web" / "c4_demo.jsonl"
SFT = Path(__file__).parents[1] / "recipes" / "data" / "sft" / "identity.jsonl"
runner = CliRunner()


def llmctl(*args: object) -> tuple[int, str]:
    """(exit code, all output on one line); an exception other than an exit is re-raised."""
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, " ".join(result.output.split())  # stdout and stderr


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(PARAS, 300), out, 64)
    return out


def make_checkpoint(out: Path, tok_dir: Path) -> Path:
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=load_tokenizer(tok_dir).get_vocab_size()))
    files = {n: tok_dir / n for n in ("tokenizer.json", "tokenizer_config.json")}
    with building(out, kind="checkpoint", command="test", config={}) as art:
        save_checkpoint(art.dir, model, files)
    return out


@pytest.fixture(scope="module")
def ckpt(tok_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ck") / "model", tok_dir)


def rehash(ckpt: Path, name: str) -> None:
    """Record a file's current size and sha256 in the manifest: damage that the manifest
    check cannot see (a bug upstream, or a manifest rewritten along with the file)."""
    path = ckpt / "manifest.json"
    m = json.loads(path.read_text())
    m["files"][name] = {"bytes": (ckpt / name).stat().st_size, "sha256": sha256_file(ckpt / name)}
    path.write_text(json.dumps(m))


def run_on(command: str, ckpt: Path) -> tuple[int, str]:
    if command == "generate":
        return llmctl("generate", ckpt, "--prompt", "To be", "--max-new-tokens", "2", "-q")
    if command == "export":
        out = ckpt.parent / "export"
        return llmctl("export", ckpt, "--format", "gguf", "--out", out, "--force", "-q")
    if command in ("finetune", "lora"):
        return llmctl(command, ckpt, SFT, "--out", ckpt.parent / command, "--steps", "1",
                      "--batch-size", "2", "--device", "cpu", "--force", "-q")  # fmt: skip
    return llmctl("eval", ckpt, DATA, "--max-tokens", "200", "-q")


# --- C3/C4: damaged model.safetensors ---------------------------------------------------------


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def huge_header(path: Path) -> None:
    # The first 8 bytes are the header's length; safetensors refuses more than 100 MB.
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 200_000_000) + data[8:])


def random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


def overlapping(path: Path) -> None:
    """Two tensors pointing at the same bytes (the header rewritten, its length with it)."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["norm_f.weight"]["data_offsets"] = header["blocks.0.norm1.weight"]["data_offsets"]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


def nan_weight(path: Path) -> None:
    tensors = load_file(path)
    tensors["blocks.0.attn.q_proj.weight"][0, 0] = float("nan")
    save_file(tensors, path)


@pytest.mark.parametrize("command", ["generate", "eval", "export", "finetune", "lora"])
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (truncated, "not a readable safetensors file"),
        (
            huge_header,  # refused from its length field, before safetensors parses it
            "not a readable safetensors file (header length 200,000,000 but",
        ),
        (random_bytes, "not a readable safetensors file"),
        (
            overlapping,
            "not a readable safetensors file (Error while deserializing header: invalid offset",
        ),
        (nan_weight, "tensor blocks.0.attn.q_proj.weight has NaN or infinite values"),
    ],
)
def test_damaged_weights_exit_2_naming_the_file(
    ckpt: Path, tmp_path: Path, command: str, damage, message: str
) -> None:  # type: ignore[no-untyped-def]
    copy = Path(shutil.copytree(ckpt, tmp_path / "model"))
    weights = copy / "model.safetensors"
    damage(weights)
    code, out = run_on(command, copy)  # the manifest check sees it first
    assert code == 2, out
    assert f"error: {weights}: " in out and "differs from the manifest" in out
    rehash(copy, "model.safetensors")
    code, out = run_on(command, copy)  # and the loader, when the manifest agrees
    assert code == 2, out
    assert f"error: {weights}: {message}" in out
    assert "Traceback" not in out


# --- C6: a checkpoint whose tokenizer does not match its model ----------------------------------
# pretrain takes vocab_size from the tokenizer and copies that tokenizer.json into the
# checkpoint, so the only way to a mismatch is editing a published checkpoint: the manifest's
# sha256s catch that before either file is used.


def edit_vocab(copy: Path, tok_dir: Path, tmp_path: Path) -> Path:
    path = copy / "config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 1}, indent=2) + "\n")
    return path


def swap_tokenizer(copy: Path, tok_dir: Path, tmp_path: Path) -> Path:
    other = tmp_path / "other"
    save_tokenizer(train_tokenizer(PARAS[:200], 280), other, 64)
    shutil.copyfile(other / "tokenizer.json", copy / "tokenizer.json")
    return copy / "tokenizer.json"


@pytest.mark.parametrize("command", ["generate", "eval", "export", "finetune", "lora"])
@pytest.mark.parametrize("edit", [edit_vocab, swap_tokenizer])
def test_tokenizer_model_mismatch_is_refused(
    ckpt: Path, tok_dir: Path, tmp_path: Path, command: str, edit
) -> None:  # type: ignore[no-untyped-def]
    copy = Path(shutil.copytree(ckpt, tmp_path / "model"))
    assert run_on(command, copy)[0] == 0
    path = edit(copy, tok_dir, tmp_path)
    code, out = run_on(command, copy)
    assert code == 2, out
    assert f"error: {path}: " in out and "differs from the manifest" in out


# --- D6: one JSONL line longer than max_line_bytes ----------------------------------------------

SHORT = [p for p in PARAS if 200 < len(p.encode()) < 600][:3]


def long_line_input(folder: Path) -> Path:
    folder.mkdir()
    lines = [{"text": SHORT[0]}, {"text": "x" * 1_000_000}, {"text": SHORT[1]}, {"text": SHORT[2]}]
    path = folder / "a.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


def error_lines(art: Path) -> list[tuple[str, int, str]]:
    rows = (art / "rejected" / "errors.jsonl").read_text().splitlines()
    return [(Path(e["file"]).name, e["line"], e["reason"]) for e in map(json.loads, rows)]


def test_clean_skips_an_over_long_line_and_reads_on(tmp_path: Path) -> None:
    src = long_line_input(tmp_path / "in")
    out = tmp_path / "docs"
    code, msg = llmctl("clean", src, "--out", out, "--set", "max_line_bytes=1000", "-j", "1")
    assert code == 0, msg
    assert error_lines(out) == [("a.jsonl", 2, "line_too_long")]
    stats = open_artifact(out, "docs").stats
    assert stats["malformed_by_reason"] == {"line_too_long": 1}
    assert stats["docs_in"] == 3  # lines 1, 3 and 4
    assert "line_too_long" in msg  # in the summary table


def test_tokenize_skips_an_over_long_line_and_reads_on(tok_dir: Path, tmp_path: Path) -> None:
    src = long_line_input(tmp_path / "in")
    out = tmp_path / "tokens"
    code, msg = llmctl(
        "tokenize", src, "--out", out, "--tokenizer", tok_dir / "tokenizer.json",
        "--set", "max_line_bytes=1000", "--val-fraction", "0", "-j", "1", "-q",
    )  # fmt: skip
    assert code == 0, msg
    assert error_lines(out) == [("a.jsonl", 2, "line_too_long")]
    stats = open_artifact(out, "tokens").stats
    assert stats["bad_records"] == {"line_too_long": 1}
    assert stats["docs"] == {"train": 3, "val": 0}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_an_over_long_line_is_never_held_in_memory(tmp_path: Path, suffix: str) -> None:
    body = b'{"text": "a"}\n{"text": "' + b"x" * (32 << 20) + b'"}\n{"text": "b"}\n'
    path = tmp_path / f"big{suffix}"
    path.write_bytes(gzip.compress(body, 1) if suffix.endswith(".gz") else body)
    del body
    tracemalloc.start()
    try:
        got = [
            (r.line, getattr(r, "reason", "raw"))
            for r in iter_raw([path], ReadOptions(max_line_bytes=1000))
        ]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [(1, "raw"), (2, "line_too_long"), (3, "raw")]
    assert peak < 8 << 20  # the 32 MB line is read and dropped in 1 MB pieces


# --- D8: records no stage may crash on ---------------------------------------------------------

OPTS = ReadOptions()
# Strings with lone surrogates, as JSON's \ud800 escapes decode to.
SURROGATE_TEXT = st.lists(
    st.one_of(st.text(max_size=6), st.characters(categories=["Cs"])), max_size=6
).map("".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | SURROGATE_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(SURROGATE_TEXT, inner, max_size=3),
    max_leaves=8,
)
RECORDS = st.dictionaries(
    st.sampled_from(["text", "id", "source", "url", "meta", "\ud800"]) | SURROGATE_TEXT,
    JSON_VALUES,
    max_size=5,
)


def written(item: Doc | BadRecord) -> bytes:
    """What a stage writes for a parsed record (docs.ShardWriter or docs.ErrorLog)."""
    return (docs._to_json(item.to_record()) + "\n").encode("utf-8")


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=120), RECORDS.map(lambda r: json.dumps(r).encode())))
def test_parse_raw_never_raises_and_its_output_is_writable(payload: bytes) -> None:
    item = parse_raw(Raw("f.jsonl", 1, "json", payload), OPTS)
    assert isinstance(item, Doc | BadRecord)
    written(item)


@pytest.mark.parametrize(
    ("payload", "reason", "excerpt"),
    [
        (b"[" * 100_000, "bad_json", "nested too deeply: [[["),
        (b'{"text": "a", "n": ' + b"1" * 5000 + b"}", "bad_json", "Exceeds the limit (4300"),
        (b'{"text": "fine", "title": "\\udc80"}', "lone_surrogate", "in field(s) title"),
        (b'{"text": "fine", "\\ud800": 1}', "lone_surrogate", "in field(s) ?"),
    ],
)
def test_records_that_crashed_stages_are_bad_records(
    payload: bytes, reason: str, excerpt: str
) -> None:
    item = parse_raw(Raw("f.jsonl", 7, "json", payload), OPTS)
    assert isinstance(item, BadRecord)
    assert (item.line, item.reason) == (7, reason)
    assert item.excerpt.startswith(excerpt)
    written(item)


def test_clean_keeps_non_json_parquet_values_as_text(tmp_path: Path) -> None:
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(x)["text"] for x in WEB.read_text().splitlines()[:3]]
    when = datetime.datetime(2019, 4, 25, 12, 57, 54)
    table = pa.table({"text": texts, "timestamp": [when] * 3, "raw": [b"\x00\xff"] * 3})
    pq.write_table(table, tmp_path / "a.parquet")
    out = tmp_path / "docs"
    code, msg = llmctl("clean", tmp_path / "a.parquet", "--out", out, "-j", "1", "-q")
    assert code == 0, msg
    rows = list(docs.read_docs_artifact(out))
    with gzip.open(out / "rejected" / "dropped-00000.jsonl.gz", "rt") as f:
        dropped = f.read().splitlines()
    assert len(rows) + len(dropped) == 3
    for row in [*rows, *map(json.loads, dropped)]:
        assert (row["timestamp"], row["raw"]) == ("2019-04-25 12:57:54", "b'\\x00\\xff'")


# --- B3: the disk fills up while `clean` writes --------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
def test_disk_full_mid_write_leaves_no_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    out = tmp_path / "docs"
    if force:  # a previous artifact that must survive the failed rebuild
        assert llmctl("clean", WEB, "--out", out, "-j", "1", "-q")[0] == 0
        before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_write, calls = docs.ShardWriter.write, []

    def write(self: docs.ShardWriter, record: dict) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(self, record)

    monkeypatch.setattr(docs.ShardWriter, "write", write)
    args = ["--force"] if force else []
    code, msg = llmctl("clean", WEB, "--out", out, "-j", "1", "-q", *args)
    assert code == 1
    assert msg == f"error: {out}: No space left on device"  # one line, no traceback
    assert sorted(p.name for p in tmp_path.iterdir()) == (["docs"] if force else [])
    assert not partial_dir(out).exists()
    if force:
        open_artifact(out, "docs")
        assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_error_lines_print_paths_verbatim(tmp_path: Path) -> None:
    missing = tmp_path / "[abc]" / "x.jsonl"  # rich would read [abc] as a style tag
    code, msg = llmctl("clean", missing, "--out", tmp_path / "docs")
    assert (code, msg) == (2, f"error: {missing}: no such file or directory")
