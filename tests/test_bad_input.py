"""Hostile inputs, as a matrix: every command × every kind of bad input it can be given.

Each command is one `Row` (its input slots and how to call it); each bad input is one `Case`
(how to damage a good input of some kind, and which class of fault it is). The two classes of
docs/design.md §5 give the expected outcome:
- file or artifact level ("refused"): exit 2, exactly one line on stderr naming the file,
  no traceback, nothing published;
- record level ("record"): exit 0, the artifact published with the record in
  rejected/errors.jsonl; exit 2 naming file:line under --strict.
A later command (align, distill, quantize, ...) joins by adding its row to ROWS, as finetune,
lora, import and export did; a later input kind (adapter) by adding its good input to `inputs`
and its cases.
Everything runs in-process through typer's CliRunner. Manifests, token-shard headers and
safetensors headers are also fuzzed with hypothesis (bounded example counts).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import re
import shutil
import socket
import stat
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llmctl import artifacts, files
from llmctl.artifacts import KINDS, Manifest, open_artifact, partial_dir, sha256_file
from llmctl.cli import app
from llmctl.data.docs import BadRecord, Raw, ReadOptions, iter_raw
from llmctl.data.tokens import HEADER_BYTES, MAGIC, read_header, read_shard
from llmctl.errors import UsageError
from llmctl.model.io import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

RAW = Path(__file__).parent / "data" / "dedup" / "c4_sample.jsonl"  # 40 real C4 documents
runner = CliRunner()
ROOT = os.geteuid() == 0


def llmctl(*args: object) -> tuple[int, str, str]:
    """(exit code, stdout, stderr); an exception other than an exit is re-raised."""
    result = runner.invoke(app, [os.fsdecode(a) if isinstance(a, Path) else a for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def ok(*args: object) -> None:
    code, _, err = llmctl(*args)
    assert code == 0, err


# --- good inputs, built once by the real commands ----------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One good input of each kind a slot can take."""
    d = tmp_path_factory.mktemp("good")
    shutil.copyfile(RAW, d / "raw.jsonl")
    ok("dedup", d / "raw.jsonl", "--out", d / "docs", "-j", "1", "-q")
    ok("tokenize", d / "docs", "--out", d / "tokens", "--vocab-size", "300",
       "--val-fraction", "0.2", "-j", "1", "-q")  # fmt: skip
    ok("pretrain", d / "tokens", "--out", d / "checkpoint", *TINY, "-q")
    (d / "prompts.jsonl").write_text('{"prompt": "The"}\n{"prompt": "A"}\n')
    shutil.copyfile(d / "tokens" / "tokenizer.json", d / "tokenizer.json")
    chat = Path(__file__).parent.parent / "recipes" / "data" / "sft" / "identity.jsonl"
    (d / "chat.jsonl").write_text("".join(chat.read_text().splitlines(keepends=True)[:20]))
    pairs = [{"prompt": f"Count to {k}.", "chosen": " ".join(map(str, range(1, k + 1))),
              "rejected": "No."} for k in range(2, 12)]  # fmt: skip
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    _llama2c(d / "l2c.bin", d / "tok.bin")
    return {
        "file": d / "raw.jsonl",
        "docs": d / "docs",
        "tokens": d / "tokens",
        "checkpoint": d / "checkpoint",
        "prompts": d / "prompts.jsonl",
        "tokfile": d / "tokenizer.json",
        "chat": d / "chat.jsonl",
        "pairs": d / "pairs.jsonl",
        "l2c": d / "l2c.bin",
        "l2ctok": d / "tok.bin",
    }


def _llama2c(model: Path, tok: Path) -> None:
    """A tiny llama2.c model (legacy header, random weights) and its tokenizer file."""
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n", *(f"<0x{b:02X}>" for b in range(256)), " a"]
    dim, hidden, layers, heads, vocab, seq = 8, 16, 1, 2, len(pieces), 8
    n = vocab * dim + layers * (2 * dim + 4 * dim * dim + 3 * hidden * dim) + dim
    n += seq * dim // heads
    weights = struct.pack(f"<{n}f", *(((i * 7919) % 13 - 6) / 20 for i in range(n)))
    model.write_bytes(struct.pack("<7i", dim, hidden, layers, heads, heads, vocab, seq) + weights)
    body = b"".join(
        struct.pack("<fi", -i, len(p.encode())) + p.encode() for i, p in enumerate(pieces)
    )
    tok.write_bytes(struct.pack("<i", 8) + body)


# --- the commands: one row each ------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One input of a command: the kinds it takes (the first is its default) and the content
    cases that reach a file it actually reads (a tokens artifact given as --tokenizer reads
    only its tokenizer files, so a damaged shard there is no fault)."""

    takes: tuple[str, ...]
    content: tuple[str, ...] = ()
    required: bool = True
    any_kind: bool = False  # takes every artifact kind (lineage, report): no wrong kind


@dataclass(frozen=True)
class Row:
    slots: dict[str, Slot]
    argv: Callable[[dict[str, Path | None], Path], list[object]]
    strict: tuple[str, ...] = ("--strict",)  # how to ask for record faults to be exit 2
    writes: bool = True  # publishes an artifact at out (with rejected/errors.jsonl if data)
    config: bool = True  # takes --config (lineage has no settings)
    prompt_faults: int = 2  # exit code for a bad prompt record (align skips it: 0)


DATA_CASES = ("docs_shard_garbage", "docs_shard_cut")
CKPT_CASES = (
    "config_not_json", "config_not_object", "tokenizer_json_bad", "tokenizer_config_bad",
    "safetensors_short", "safetensors_overclaim", "safetensors_header_garbage",
)  # fmt: skip
TOKEN_CASES = ("shard_bad_magic", "shard_count_lies", "shard_id_out_of_range")
TOKENIZER_CASES = ("tokenizer_json_bad", "tokenizer_config_bad")
J1 = ("-j", "1", "-q")
TINY = ("--preset", "tiny", "--steps", "1", "--batch-size", "2", "--seq-len", "16")  # fmt: skip
TINY += ("--device", "cpu")
ONE_TOKEN = ("--max-new-tokens", "1", "--device", "cpu", "-q")
ONE_STEP = ("--steps", "1", "--batch-size", "2", "--device", "cpu", "-q")
# static quantization reading all of its calibration data (so a fault at the end is reached)
QUANT = ("--method", "static", "--set", "eval_tokens=64", "--set", "decode_tokens=2",
         "--set", "calib_tokens=100000000", "-q", "--calib")  # fmt: skip

ROWS: dict[str, Row] = {
    "clean": Row(
        {"input": Slot(("file", "docs"), DATA_CASES)},
        lambda a, out: ["clean", a["input"], "--out", out, *J1],
    ),
    "dedup": Row(
        {
            "input": Slot(("file", "docs"), DATA_CASES),
            "decontaminate": Slot(("file", "docs"), DATA_CASES, required=False),
        },
        lambda a, out: (
            ["dedup", a["input"], "--out", out, *J1]
            + (["--decontaminate", a["decontaminate"]] if a["decontaminate"] else [])
        ),
    ),
    "tokenize": Row(
        {
            "input": Slot(("docs", "file"), DATA_CASES),
            "tokenizer": Slot(("tokens", "checkpoint", "tokfile"), TOKENIZER_CASES, False),
        },
        lambda a, out: (
            ["tokenize", a["input"], "--out", out, "--vocab-size", "300", *J1]
            + (["--tokenizer", a["tokenizer"]] if a["tokenizer"] else [])
        ),
    ),
    "pretrain": Row(
        {"tokens": Slot(("tokens",), (*TOKEN_CASES, *TOKENIZER_CASES))},
        lambda a, out: ["pretrain", a["tokens"], "--out", out, *TINY, "-q"],
    ),
    "eval": Row(
        {
            "checkpoint": Slot(("checkpoint",), CKPT_CASES),
            "data": Slot(("tokens", "docs", "file"), (*TOKEN_CASES, *DATA_CASES)),
        },
        lambda a, out: ["eval", a["checkpoint"], a["data"], "--device", "cpu", "-q"],
        strict=("--set", "strict=true"),
        writes=False,
    ),
    "generate": Row(
        {
            "checkpoint": Slot(("checkpoint",), CKPT_CASES),
            "prompts": Slot(("prompts",)),
            # the draft's tokenizer is compared by hash with the model's, not parsed
            "draft": Slot(("checkpoint",), CKPT_CASES[:2] + CKPT_CASES[4:], required=False),
        },
        lambda a, out: (
            ["generate", a["checkpoint"], "--prompts", a["prompts"], *ONE_TOKEN]
            + (["--draft", a["draft"]] if a["draft"] else [])
        ),
        writes=False,
    ),
    "finetune": Row(
        {
            "checkpoint": Slot(("checkpoint",), CKPT_CASES),
            "input": Slot(("chat",)),
        },
        lambda a, out: ["finetune", a["checkpoint"], a["input"], "--out", out, *ONE_STEP],
    ),
    # align: the checkpoint (the reference), and preference pairs (records skipped or --strict)
    "align": Row(
        {
            "checkpoint": Slot(("checkpoint",), CKPT_CASES),
            "input": Slot(("pairs",)),
        },
        lambda a, out: ["align", a["checkpoint"], a["input"], "--out", out, *ONE_STEP],
    ),
    # online RL and RLAIF: the policy checkpoint, prompts; a builtin reward / the policy as judge
    "align-grpo": Row(
        {
            "checkpoint": Slot(("checkpoint",), CKPT_CASES),
            "input": Slot(("prompts",)),
        },
        lambda a, out: [
            "align",
            a["checkpoint"],
            a["input"],
            "--out",
            out,
            "--method",
            "grpo",
            "--reward",
            "builtin:distinct",
            "--set",
            "group_size=2",
            "--set",
            "max_new_tokens=2",
            "--set",
            "eval_prompts=0",
            *ONE_STEP,
        ],
        prompt_faults=0,
    ),
    "align-rlaif": Row(
        {
            "checkpoint": Slot(("checkpoint",), CKPT_CASES),
            "input": Slot(("prompts",)),
            "judge": Slot(("checkpoint",), CKPT_CASES),
        },
        lambda a, out: [
            "align",
            a["checkpoint"],
            a["input"],
            "--out",
            out,
            "--method",
            "rlaif",
            "--judge",
            f"judge:{a['judge']}",
            "--set",
            "rlaif.k=2",
            "--set",
            "rlaif.max_new_tokens=2",
            *ONE_STEP,
        ],
        prompt_faults=0,
    ),
    "lora": Row(
        {
            "checkpoint": Slot(("checkpoint",), CKPT_CASES),
            "input": Slot(("chat", "tokens"), TOKEN_CASES),
        },
        lambda a, out: ["lora", a["checkpoint"], a["input"], "--out", out, *ONE_STEP],
    ),
    "export": Row(
        {"checkpoint": Slot(("checkpoint",), CKPT_CASES)},
        lambda a, out: ["export", a["checkpoint"], "--format", "gguf", "--out", out, "-q"],
        strict=(),
    ),
    "import": Row(
        {"model": Slot(("l2c",)), "tokenizer": Slot(("l2ctok",))},
        lambda a, out: ["import", "llama2c", a["model"], a["tokenizer"], "--out", out, "-q"],
        strict=(),
    ),
    # quantize static: the checkpoint, and calibration data (tokens, documents or a file)
    "quantize": Row(
        {
            "checkpoint": Slot(("checkpoint",), CKPT_CASES),
            "calib": Slot(("tokens", "docs", "file"), (*TOKEN_CASES, *DATA_CASES)),
        },
        lambda a, out: ["quantize", a["checkpoint"], "--out", out, *QUANT, a["calib"]],
        strict=("--set", "strict=true"),
    ),
    # distill (logit): the teacher's tokenizer.json is compared by hash with the data's, not
    # parsed; the data's tokenizer files are parsed
    "distill": Row(
        {
            "tokens": Slot(("tokens",), (*TOKEN_CASES, *TOKENIZER_CASES)),
            "teacher": Slot(("checkpoint",), CKPT_CASES[:2] + CKPT_CASES[4:]),
        },
        lambda a, out: [
            "distill",
            a["tokens"],
            "--teacher",
            a["teacher"],
            "--out",
            out,
            "--kind",
            "logit",
            "--student-preset",
            *TINY[1:],
            "-q",
        ],
        strict=("--set", "strict=true"),
    ),
    # distill (sequence): prompts answered by the teacher checkpoint, whose files are all read
    "distill-sequence": Row(
        {"prompts": Slot(("prompts",)), "teacher": Slot(("checkpoint",), CKPT_CASES)},
        lambda a, out: [
            "distill",
            a["prompts"],
            "--teacher",
            a["teacher"],
            "--out",
            out,
            "--kind",
            "sequence",
            "--student-preset",
            *TINY[1:],
            "--set",
            "gen.max_new_tokens=2",
            "--set",
            "val_fraction=0",
            "-q",
        ],
        strict=("--set", "strict=true"),
    ),
    # lineage and report read manifests and hash files, never parse a checkpoint's content
    "lineage": Row(
        {"artifact": Slot(("checkpoint",), any_kind=True)},
        lambda a, out: ["lineage", a["artifact"], "--json", "-q"],
        strict=(),
        writes=False,
        config=False,
    ),
    "report": Row(
        {"artifact": Slot(("checkpoint",), any_kind=True)},
        lambda a, out: ["report", a["artifact"], "--out", out, "--set", "eval_tokens=64", "-q"],
        strict=(),
    ),
}


# --- the cases -----------------------------------------------------------------------------------


@dataclass
class Ctx:
    good: Path  # the good input of the kind under test
    tmp: Path
    inputs: dict[str, Path]
    takes: tuple[str, ...]
    args: list[str] = field(default_factory=list)  # extra argv the case needs


Named = str | re.Pattern[str]


@dataclass(frozen=True)
class Case:
    kinds: tuple[str, ...]  # input kinds it applies to ("artifact": every artifact kind)
    make: Callable[[Ctx], tuple[Path, Named]]  # -> (the bad input, what the error must name)
    outcome: str  # "refused" (exit 2), "record" (exit 0; 2 under strict), "kept" (exit 0)
    reason: str = ""  # record cases: the reason in rejected/errors.jsonl
    content: bool = False  # a content case: only for the slots that list it


def copy(ctx: Ctx) -> Path:
    return Path(shutil.copytree(ctx.good, ctx.tmp / "in" / ctx.good.name, symlinks=True))


def manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def set_manifest(art: Path, data: object) -> None:
    (art / "manifest.json").write_text(json.dumps(data))


# A listed file every command that takes the kind reads (a tokens artifact given as
# --tokenizer is opened without hashing its shards: they are not read).
READ_FILE = {"docs": "shard-00000.jsonl.gz", "tokens": "tokenizer.json"}


def a_file(art: Path) -> str:
    return READ_FILE.get(manifest(art)["kind"], "tokenizer.json")


def rehash(art: Path, *names: str) -> None:
    """Record files' current size and sha256 in the manifest: damage the manifest cannot see
    (a producer bug, or a manifest rewritten with the file), left to the content checks."""
    m = manifest(art)
    for name in names:
        m["files"][name] = {"bytes": (art / name).stat().st_size, "sha256": sha256_file(art / name)}
    set_manifest(art, m)


def manifest_case(edit: Callable[[Path], None]) -> Callable[[Ctx], tuple[Path, Named]]:
    def make(ctx: Ctx) -> tuple[Path, Named]:
        art = copy(ctx)
        edit(art)
        return art, str(art / "manifest.json")

    return make


def edit_fields(**fields: object) -> Callable[[Path], None]:
    return lambda art: set_manifest(art, {**manifest(art), **fields})


def add_entry(name: Callable[[Path, Path], str]) -> Callable[[Ctx], tuple[Path, Named]]:
    """A files entry naming a real file outside the artifact, with its true size and hash."""

    def make(ctx: Ctx) -> tuple[Path, Named]:
        art = copy(ctx)
        outside = ctx.tmp / "outside.txt"
        outside.write_text("outside\n")
        m = manifest(art)
        meta = {"bytes": outside.stat().st_size, "sha256": sha256_file(outside)}
        m["files"][name(art, outside)] = meta
        set_manifest(art, m)
        return art, str(art / "manifest.json")

    return make


def listed_case(edit: Callable[[Path, Path], None]) -> Callable[[Ctx], tuple[Path, Named]]:
    def make(ctx: Ctx) -> tuple[Path, Named]:
        art = copy(ctx)
        target = art / a_file(art)
        edit(target, ctx.tmp)
        return art, str(target)

    return make


def symlink_out(target: Path, tmp: Path) -> None:
    """The same bytes, but reached through a link that leaves the artifact."""
    twin = tmp / "twin"
    shutil.copyfile(target, twin)
    target.unlink()
    target.symlink_to(twin)


def fifo(target: Path, tmp: Path) -> None:
    target.unlink()
    os.mkfifo(target)


def flip_byte(target: Path, tmp: Path) -> None:
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


def content_case(*names: str, damage: Callable[[Path], None]) -> Callable[[Ctx], tuple]:
    """Damage files inside a copy of the artifact and rehash them; the error names one."""

    def make(ctx: Ctx) -> tuple[Path, Named]:
        art = copy(ctx)
        present = [n for n in (_expand(art, n) for n in names) for n in n]
        for name in present:
            damage(art / name)
        rehash(art, *present)
        return art, re.compile("(" + "|".join(re.escape(str(art / n)) for n in present) + ")")

    return make


def _expand(art: Path, pattern: str) -> list[str]:
    return [p.relative_to(art).as_posix() for p in Manifest(art, manifest(art)).listed(pattern)]


def write(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


def st_header_len(extra: int) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        data = p.read_bytes()
        p.write_bytes(struct.pack("<Q", len(data) - 8 + extra) + data[8:])

    return damage


def st_header_garbage(p: Path) -> None:
    data = p.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    p.write_bytes(data[:8] + b"{" * n + data[8 + n :])


def shard_field(offset: int, fmt: str, value: Callable[[int], int]) -> Callable[[Path], None]:
    def damage(p: Path) -> None:
        data = bytearray(p.read_bytes())
        (old,) = struct.unpack_from(fmt, data, offset)
        struct.pack_into(fmt, data, offset, value(old))
        p.write_bytes(bytes(data))

    return damage


def big_ids(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[HEADER_BYTES : HEADER_BYTES + 2] = b"\xff\xff"  # id 65535 in a 300-token vocabulary
    p.write_bytes(bytes(data))


def cut_gzip(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def wrong_kind(ctx: Ctx) -> tuple[Path, Named]:
    other = next(k for k in KINDS if k in ctx.inputs and k not in ctx.takes)
    return ctx.inputs[other], str(ctx.inputs[other])


# Input files: each case writes a file (or something in its place) named like the good one.


def file_case(make_path: Callable[[Ctx, Path], Path]) -> Callable[[Ctx], tuple[Path, Named]]:
    def make(ctx: Ctx) -> tuple[Path, Named]:
        path = make_path(ctx, ctx.tmp / ctx.good.name)
        return path, str(path)

    return make


def mkfifo(ctx: Ctx, path: Path) -> Path:
    os.mkfifo(path)
    return path


def dev_zero(ctx: Ctx, path: Path) -> Path:
    path.symlink_to("/dev/zero")  # read, it would never end
    return path


def unix_socket(ctx: Ctx, path: Path) -> Path:
    if len(os.fsencode(path)) > 100:
        pytest.skip("path too long for a unix socket")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fsdecode(path))
    return path


def unreadable(ctx: Ctx, path: Path) -> Path:
    if ROOT:
        pytest.skip("root reads any file")
    shutil.copyfile(ctx.good, path)
    path.chmod(0)
    return path


def non_utf8_name(ctx: Ctx, path: Path) -> Path:
    name = os.fsencode(path.parent) + b"/caf\xe9-" + os.fsencode(path.name)
    shutil.copyfile(ctx.good, name)
    return Path(os.fsdecode(name))


def not_json(ctx: Ctx, path: Path) -> Path:
    path.write_text("{")
    return path


def records(lines: list[bytes], suffix: str = "") -> Callable[[Ctx, Path], Path]:
    """The good file with `lines` inserted after its 3rd line, compressed by `suffix`."""

    def make(ctx: Ctx, path: Path) -> Path:
        good = ctx.good.read_bytes().splitlines(keepends=True)
        body = b"".join(good[:3] + lines + good[3:])
        path = path.with_name(path.name + suffix)
        path.write_bytes(body)
        return path

    return make


def cut_stream(suffix: str) -> Callable[[Ctx, Path], Path]:
    """The good file four times over, compressed, cut inside the last quarter: a gzip member,
    or four zstd frames (one block each) cut inside the fourth."""

    def make(ctx: Ctx, path: Path) -> Path:
        body = ctx.good.read_bytes()
        if suffix == ".gz":
            packed = gzip.compress(body * 4)
            cut = packed[: len(packed) * 7 // 8]
        else:
            frame = zstandard.compress(body)
            cut = frame * 3 + frame[: len(frame) // 2]
        path = path.with_name(path.name + suffix)
        path.write_bytes(cut)
        return path

    return make


def long_line(ctx: Ctx, path: Path) -> Path:
    ctx.args += ["--set", "max_line_bytes=20000"]
    return records([json.dumps({"text": "x" * 30000}).encode() + b"\n"])(ctx, path)


ART, CKPT, TOK, DOCS = ("artifact",), ("checkpoint",), ("tokens",), ("docs",)
FILES = ("file", "prompts", "tokfile", "chat", "pairs", "l2c", "l2ctok")
SHARDS = ("train-*.bin", "val-*.bin")


def refused(kinds: tuple[str, ...], make: Callable[[Ctx], tuple[Path, Named]]) -> Case:
    return Case(kinds, make, "refused")


def damaged(kinds: tuple[str, ...], *names: str, damage: Callable[[Path], None]) -> Case:
    return Case(kinds, content_case(*names, damage=damage), "refused", content=True)


def manifest_bytes(data: bytes) -> Callable[[Ctx], tuple[Path, Named]]:
    return manifest_case(lambda art: (art / "manifest.json").write_bytes(data))


def record(kinds: tuple[str, ...], make: Callable[[Ctx, Path], Path], reason: str) -> Case:
    return Case(kinds, file_case(make), "record", reason)


CASES: dict[str, Case] = {
    # the manifest
    "manifest_not_json": refused(ART, manifest_bytes(b"{")),
    "manifest_not_object": refused(ART, manifest_bytes(b"[1, 2]")),
    "manifest_not_utf8": refused(ART, manifest_bytes(b'{"kind": "\xff"}')),
    "manifest_nested": refused(ART, manifest_bytes(b"[" * 100_000)),
    "manifest_fifo": refused(ART, manifest_case(lambda art: fifo(art / "manifest.json", art))),
    "unknown_schema": refused(ART, manifest_case(edit_fields(schema=2))),
    "schema_true": refused(ART, manifest_case(edit_fields(schema=True))),
    "unknown_kind": refused(ART, manifest_case(edit_fields(kind="weights"))),
    "files_not_object": refused(ART, manifest_case(edit_fields(files=[]))),
    "entry_bad_meta": refused(ART, manifest_case(lambda art: set_manifest(
        art, {**manifest(art), "files": {a_file(art): {"bytes": "1"}}}))),
    "entry_absolute": refused(ART, add_entry(lambda art, outside: str(outside))),
    "entry_dotdot": refused(ART, add_entry(lambda art, outside: os.path.relpath(outside, art))),
    "wrong_kind": refused(ART, wrong_kind),
    # the files it lists
    "entry_symlink_out": refused(ART, listed_case(symlink_out)),
    "listed_missing": refused(ART, listed_case(lambda t, tmp: t.unlink())),
    "listed_oversized": refused(ART, listed_case(lambda t, tmp: t.write_bytes(
        t.read_bytes() + b"x" * 4096))),
    "listed_hash_differs": refused(ART, listed_case(flip_byte)),
    "listed_fifo": refused(ART, listed_case(fifo)),
    # contents the manifest agrees with (rehashed): the content checks must see them
    "config_not_json": damaged(CKPT, "config.json", damage=write(b"{")),
    "config_not_object": damaged(CKPT, "config.json", damage=write(b"[]")),
    "tokenizer_json_bad": damaged((*CKPT, *TOK), "tokenizer.json", damage=write(b"{")),
    "tokenizer_config_bad": damaged((*CKPT, *TOK), "tokenizer_config.json", damage=write(b"{")),
    "safetensors_short": damaged(CKPT, "model.safetensors", damage=write(b"\x10\0\0")),
    "safetensors_overclaim": damaged(CKPT, "model.safetensors", damage=st_header_len(1)),
    "safetensors_header_garbage": damaged(CKPT, "model.safetensors", damage=st_header_garbage),
    "shard_bad_magic": damaged(TOK, *SHARDS, damage=shard_field(0, "<Q", lambda v: 0)),
    "shard_count_lies": damaged(TOK, *SHARDS, damage=shard_field(16, "<Q", lambda v: v + 1)),
    "shard_id_out_of_range": damaged(TOK, *SHARDS, damage=big_ids),
    "docs_shard_garbage": damaged(DOCS, "shard-*.jsonl.gz", damage=write(b"\x1f\x8bnot gzip")),
    "docs_shard_cut": damaged(DOCS, "shard-*.jsonl.gz", damage=cut_gzip),
    # input files
    "missing": refused(FILES, file_case(lambda ctx, p: p)),
    "fifo": refused(FILES, file_case(mkfifo)),
    "device": refused(FILES, file_case(dev_zero)),
    "socket": refused(FILES, file_case(unix_socket)),
    "unreadable": refused(FILES, file_case(unreadable)),
    "tokenizer_file_bad": refused(("tokfile",), file_case(not_json)),
    "non_utf8_name": Case(("file", "prompts"), file_case(non_utf8_name), "kept"),
    # records (prompts: each line is a request, so a bad one is refused, never skipped)
    "bad_json_line": record(
        ("file", "prompts", "chat", "pairs"), records([b"{not json\n"]), "bad_json"
    ),
    "bad_utf8_line": record(
        ("file", "prompts", "chat", "pairs"), records([b'{"text": "\xff"}\n']), "invalid_utf8"
    ),
    # a llama2.c file whose header disagrees with its size (a half-copied download)
    "l2c_cut": refused(("l2c",), file_case(lambda ctx, p: (
        p.write_bytes(ctx.good.read_bytes()[:-12]), p)[1])),
    "l2c_tok_cut": refused(("l2ctok",), file_case(lambda ctx, p: (
        p.write_bytes(ctx.good.read_bytes()[:-3]), p)[1])),
    "long_line": record(("file",), long_line, "line_too_long"),
    "gzip_cut": record(("file",), cut_stream(".gz"), "truncated_file"),
    "zstd_cut": record(("file",), cut_stream(".zst"), "truncated_file"),
}  # fmt: skip


def matrix() -> list[tuple[str, str, str, str, bool]]:
    """(command, slot, input kind, case, strict) for every case a slot's kinds admit."""
    out = []
    for command, row in ROWS.items():
        for slot_name, slot in row.slots.items():
            for kind in slot.takes:
                for name, case in CASES.items():
                    fits = kind in case.kinds or ("artifact" in case.kinds and kind in KINDS)
                    if not fits or (case.content and name not in slot.content):
                        continue
                    if name == "wrong_kind" and slot.any_kind:
                        continue
                    out.append((command, slot_name, kind, name, False))
                    if case.outcome == "record" and kind != "prompts":
                        out.append((command, slot_name, kind, name, True))
    return out


def expected(kind: str, case: Case, strict: bool, row: Row) -> int:
    if case.outcome == "refused" or (case.outcome == "record" and strict):
        return 2
    if case.outcome == "record" and kind == "prompts":
        return row.prompt_faults
    return 0


@pytest.mark.parametrize(("command", "slot", "kind", "case", "strict"), matrix())
def test_bad_input(
    inputs: dict[str, Path], tmp_path: Path, command: str, slot: str, kind: str, case: str,
    strict: bool,
) -> None:  # fmt: skip
    row, spec = ROWS[command], CASES[case]
    ctx = Ctx(inputs[kind], tmp_path, inputs, row.slots[slot].takes)
    bad, named = spec.make(ctx)
    args = {
        s: (bad if s == slot else inputs[info.takes[0]] if info.required else None)
        for s, info in row.slots.items()
    }
    out = tmp_path / "out"
    argv = [*row.argv(args, out), *ctx.args, *(row.strict if strict else ())]
    code, stdout, err = llmctl(*argv)
    assert "Traceback" not in stdout + err
    assert code == expected(kind, spec, strict, row), err
    if code == 2:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        if isinstance(named, re.Pattern):
            assert named.search(lines[0]), (named, err)
        else:
            assert (
                os.fsdecode(named)
                .encode("utf-8", "surrogateescape")
                .decode("utf-8", "backslashreplace")
                in lines[0]
            ), (named, err)
        assert not out.exists() and not partial_dir(out).exists()
        return
    if row.writes:
        m = open_artifact(out, KINDS)
        if spec.outcome == "record" and slot == "input":
            rows = (out / "rejected" / "errors.jsonl").read_text().splitlines()
            assert spec.reason in {json.loads(r)["reason"] for r in rows}
        if case == "non_utf8_name" and slot == "input":
            assert "/caf\\xe9-" in m.data["inputs"]["input-0"]["path"]


# --- the outcomes the table promises beyond the exit code ----------------------------------------


def test_a_refused_rebuild_leaves_the_previous_artifact_untouched(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "docs"
    ok("clean", inputs["file"], "--out", out, *J1)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    os.mkfifo(tmp_path / "pipe.jsonl")
    code, _, err = llmctl("clean", tmp_path / "pipe.jsonl", "--out", out, "--force", *J1)
    assert (code, err.strip()) == (
        2,
        f"error: {tmp_path / 'pipe.jsonl'}: a named pipe (FIFO), not a regular file; "
        "llmctl reads only files",
    )
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_a_cut_stream_keeps_every_record_before_the_cut(tmp_path: Path, suffix: str) -> None:
    body = b"".join(b'{"text": "record %d %s"}\n' % (i, b"x" * (i % 97)) for i in range(60_000))
    packed = gzip.compress(body) if suffix == ".gz" else zstandard.compress(body)
    cut = packed[: len(packed) // 2]
    path = tmp_path / f"cut.jsonl{suffix}"
    path.write_bytes(cut)
    if suffix == ".gz":
        whole = gzip.zlib.decompressobj(31).decompress(cut)  # type: ignore[attr-defined]
    else:
        whole = zstandard.ZstdDecompressor().decompressobj().decompress(cut)
    complete = whole.count(b"\n")
    assert 0 < complete < 60_000
    got = list(iter_raw([path], ReadOptions()))
    assert [r.line for r in got[:-1] if isinstance(r, Raw)] == list(range(1, complete + 1))
    assert isinstance(got[-1], BadRecord) and got[-1].reason == "truncated_file"
    assert got[-1].line == complete + 1


def test_non_utf8_names_are_kept_and_shown_escaped(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Decision: a file whose name is not UTF-8 is read (the OS hands the name to Python with
    surrogateescape), and the name is written as \\xNN wherever it appears."""
    name = os.fsencode(tmp_path) + b"/caf\xe9.jsonl"
    shutil.copyfile(inputs["file"], name)
    out = tmp_path / "docs"
    ok("dedup", Path(os.fsdecode(name)), "--out", out, *J1)
    with gzip.open(out / "shard-00000.jsonl.gz", "rt", encoding="utf-8") as f:
        first = json.loads(f.readline())
    assert first["source"] == f"{tmp_path}/caf\\xe9.jsonl"
    missing = Path(os.fsdecode(os.fsencode(tmp_path) + b"/no\xff\n.jsonl"))
    code, _, err = llmctl("clean", missing, "--out", out, "--force", *J1)
    assert (code, err) == (2, f"error: {tmp_path}/no\\xff\\n.jsonl: no such file or directory\n")


# --- fuzzed headers ------------------------------------------------------------------------------

HOSTILE_NAMES = st.sampled_from(
    ["shard-00000.jsonl.gz", "../x", "/etc/hostname", "a/../../x", "", ".", "./x", "a\0b",
     "..\\x", "link", "link/x", "d", "manifest.json"]
) | st.text(max_size=12)  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
META = st.fixed_dictionaries(
    {},
    optional={
        "bytes": st.integers(-1, 10) | JSON,
        "sha256": st.sampled_from(["0" * 64, "a" * 64, "x"]) | JSON,
    },
)
MANIFESTS = st.fixed_dictionaries(
    {},
    optional={
        "schema": st.sampled_from([1, 1.0, True, "1", 2]) | JSON,
        "kind": st.sampled_from(KINDS) | JSON,
        "digest": st.just("d") | JSON,
        "files": st.dictionaries(HOSTILE_NAMES, META, max_size=3) | JSON,
        "config": JSON,
        "stats": JSON,
        "inputs": JSON,
    },
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.one_of(MANIFESTS.map(lambda m: json.dumps(m).encode()), st.binary(max_size=64)))
def test_fuzzed_manifests_open_or_refuse_in_one_line(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "art"
        root.mkdir()
        (root / "manifest.json").write_bytes(raw)
        (root / "shard-00000.jsonl.gz").write_bytes(b"")
        (root / "d").mkdir()
        (Path(d) / "x").write_bytes(b"")
        (root / "link").symlink_to(Path(d))
        try:
            m = open_artifact(root, KINDS)
        except UsageError as e:
            assert "\n" not in str(e)
            return
        for name in m.files:  # opened: every listed file is a regular file inside the artifact
            real = os.path.realpath(root / name)
            assert real.startswith(os.path.realpath(root) + os.sep)
            assert stat.S_ISREG(os.stat(real).st_mode)


@FUZZ
@given(
    header=st.binary(min_size=56, max_size=56),
    magic=st.booleans(),
    body=st.integers(0, 300),
)
def test_fuzzed_token_shard_headers_read_or_refuse(header: bytes, magic: bool, body: int) -> None:
    raw = (MAGIC + header if magic else (header + MAGIC)[:64]) + bytes(body)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train-00000.bin"
        path.write_bytes(raw)
        try:
            h = read_header(path)
        except UsageError as e:
            assert "\n" not in str(e) and str(path) in str(e)
            return
        assert HEADER_BYTES + h.count * h.itemsize == len(raw)
        assert h.eos_id < h.vocab_size
        assert len(read_shard(path)) == h.count


TENSOR = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X"]),
        "shape": st.lists(st.integers(-1, 2**40) | st.integers(0, 8), max_size=3),
        "data_offsets": st.lists(st.integers(-1, 2**64 - 1) | st.integers(0, 64), max_size=3),
    }
)
ST_HEADERS = st.dictionaries(
    st.sampled_from(["tok_emb.weight", "norm_f.weight", "__metadata__", "x"]),
    TENSOR | JSON,
    max_size=3,
)


@pytest.fixture(scope="module")
def tiny_checkpoint(inputs: dict[str, Path]) -> Path:
    return inputs["checkpoint"]


@pytest.mark.slow
@FUZZ
@given(
    header=ST_HEADERS.map(lambda h: json.dumps(h).encode()) | st.binary(max_size=40),
    length=st.none() | st.integers(0, 2**64 - 1),
    body=st.integers(0, 256),
)
def test_fuzzed_safetensors_headers_load_or_refuse(
    tiny_checkpoint: Path, header: bytes, length: int | None, body: int
) -> None:
    n = len(header) if length is None else length
    with tempfile.TemporaryDirectory() as d:
        ckpt = Path(d)
        shutil.copyfile(tiny_checkpoint / "config.json", ckpt / "config.json")
        weights = ckpt / "model.safetensors"
        weights.write_bytes(struct.pack("<Q", n) + header + bytes(body))
        with pytest.raises(ValueError, match=re.escape(str(weights))):
            load_model(ckpt)


def test_an_unreadable_file_is_one_line(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chmod 000 cannot stop root (the matrix's `unreadable` case skips there): the refusal
    is checked by making the open itself fail as it does for other users."""

    def denied(path: object, *a: object) -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(files.os, "open", denied)
    code, _, err = llmctl("clean", inputs["file"], "--out", tmp_path / "out", *J1)
    assert (code, err) == (
        2,
        f"error: {inputs['file']}: cannot read input file (Permission denied)\n",
    )


def test_an_oversized_manifest_is_refused_unread(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(artifacts, "MAX_JSON_BYTES", 100)
    code, _, err = llmctl("clean", inputs["docs"], "--out", tmp_path / "out", *J1)
    path = inputs["docs"] / "manifest.json"
    assert (code, err) == (2, f"error: {path}: manifest larger than 100 bytes; not read\n")


@pytest.mark.parametrize("make", [mkfifo, dev_zero, not_json], ids=["fifo", "device", "not_toml"])
@pytest.mark.parametrize("command", [c for c, row in ROWS.items() if row.config])
def test_every_command_refuses_a_bad_config_file_in_one_line(
    inputs: dict[str, Path], tmp_path: Path, command: str, make: Callable[[Ctx, Path], Path]
) -> None:
    row = ROWS[command]
    bad = make(Ctx(inputs["file"], tmp_path, inputs, ()), tmp_path / "cfg.toml")
    args = {s: inputs[i.takes[0]] if i.required else None for s, i in row.slots.items()}
    code, stdout, err = llmctl(*row.argv(args, tmp_path / "out"), "--config", bad)
    assert code == 2 and "Traceback" not in stdout + err
    assert err.count("\n") == 1 and err.startswith(f"error: {bad}: "), err
