"""`llmctl clean` end to end through the CLI: output files, determinism, every input format,
every kind of bad input."""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.artifacts import open_artifact
from llmctl.cli import app
from llmctl.data.docs import read_docs_artifact

DATA = Path(__file__).parent / "data" / "web"
runner = CliRunner()


def clean(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, ["clean", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output + (result.stderr or "")


def files_of(path: Path) -> dict[str, bytes]:
    return {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def rejected(path: Path) -> list[dict]:
    with gzip.open(path / "rejected" / "dropped-00000.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def errors(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "rejected" / "errors.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def web_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    inp = tmp_path_factory.mktemp("in")
    for name in ("c4_demo.jsonl", "cc_en_head-0091.jsonl"):
        shutil.copy(DATA / name, inp / name)
    return inp


@pytest.fixture(scope="module")
def web_docs(web_input: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The JSONL fixtures cleaned once with 2 workers."""
    out = tmp_path_factory.mktemp("out") / "docs"
    code, text = clean(web_input, "--out", out, "--workers", "2", "--quiet")
    assert code == 0, text
    return out


def test_output_files_and_manifest(web_docs: Path) -> None:
    names = {p.relative_to(web_docs).as_posix() for p in web_docs.rglob("*") if p.is_file()}
    assert names == {
        "manifest.json",
        "shard-00000.jsonl.gz",
        "rejected/dropped-00000.jsonl.gz",
        "rejected/errors.jsonl",
    }
    m = open_artifact(web_docs, "docs")
    s = m.stats
    assert s["docs_in"] == 23 and s["docs_kept"] + s["docs_dropped"] == 23
    assert s["malformed"] == 0
    kept = list(read_docs_artifact(web_docs))
    assert len(kept) == s["docs_kept"] >= 12
    for rec in kept:
        assert {"id", "text", "source", "language", "language_score"} <= rec.keys()
        assert rec["language"] == "en" and rec["language_score"] > 0.65
    drops = rejected(web_docs)
    assert len(drops) == s["docs_dropped"]
    by_reason: dict[str, int] = {}
    for rec in drops:
        by_reason[rec["reason"]] = by_reason.get(rec["reason"], 0) + 1
    assert by_reason == {r: d["docs"] for r, d in s["dropped_by_reason"].items()}
    texts = [
        json.loads(line)["text"]
        for name in ("c4_demo.jsonl", "cc_en_head-0091.jsonl")
        for line in (DATA / name).open(encoding="utf-8")
    ]
    assert s["text_bytes_in"] == sum(len(t.encode()) for t in texts)
    assert s["text_bytes_out"] == sum(len(r["text"].encode()) for r in kept)
    ccnet = [r for r in kept if r["source"] == "common-crawl"]
    assert ccnet and "metadata" in ccnet[0]  # input metadata is carried through


def test_byte_identical_for_any_worker_count_and_reruns(
    web_input: Path, web_docs: Path, tmp_path: Path
) -> None:
    inp = web_input
    one = tmp_path / "one"
    assert clean(inp, "--out", one, "--workers", "1", "--quiet")[0] == 0
    assert files_of(one) == files_of(web_docs)
    assert clean(inp, "--out", one, "--workers", "1", "--quiet", "--force")[0] == 0
    assert files_of(one) == files_of(web_docs)


def test_pii_and_c4_stats_are_counted(tmp_path: Path) -> None:
    words = iter(f"w{a}{b}" for a in "abcdefgh" for b in "klmnopqrst")
    body = [
        f"The {next(words)} and the {next(words)} went with {next(words)} to the {next(words)}."
        for _ in range(8)
    ]
    text = "\n".join(
        [
            *body,
            "Write to jane.doe@example.net or visit 8.8.4.4 for the details.",
            "Menu",
            "Please enable JavaScript to see the rest of the page.",
        ]
    )
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": text}) + "\n")
    out = tmp_path / "o"
    code, msg = clean(src, "--out", out, "--set", "language.enabled=false")
    assert code == 0, msg
    (rec,) = read_docs_artifact(out)
    assert "email@example.com" in rec["text"] and "22.214.171.124" in rec["text"]
    assert "JavaScript" not in rec["text"] and "Menu" not in rec["text"]
    steps = open_artifact(out, "docs").stats["steps"]
    assert steps["pii.emails"] == 1 and steps["pii.ips"] == 1
    assert steps["c4.lines_removed"] == 2
    assert "PII replaced" in msg and "C4 lines removed" in msg  # the summary table


# --- input formats ---------------------------------------------------------------------------


def test_warc_to_text_with_url(tmp_path: Path) -> None:
    out = tmp_path / "o"
    code, msg = clean(DATA / "sample-0000.warc.gz", "--out", out, "--quiet")
    assert code == 0, msg
    kept = list(read_docs_artifact(out))
    drops = rejected(out)
    docs = kept + drops
    assert docs, "no page text extracted"
    for rec in docs:
        assert rec["url"].startswith("http") and rec["id"] == rec["url"]
        assert "<html" not in rec["text"].lower() and "<div" not in rec["text"].lower()
    assert "https://soldaini.net/" in {r["url"] for r in kept}


def test_txt_file_and_paragraph_split_and_gutenberg(tmp_path: Path) -> None:
    para = "This paragraph says one thing and then says another thing with care."
    src = tmp_path / "t.txt"
    src.write_text(f"{para}\n\n  \n{para.replace('one', 'two')}\n\nthird\n")
    out = tmp_path / "o"
    args = ["--set", "language.enabled=false", "--set", "gopher_quality.enabled=false"]
    args += ["--set", "c4.enabled=false", "--set", "gopher_repetition.enabled=false"]
    args += ["--set", "fineweb.enabled=false"]
    assert clean(src, "--out", out, *args, "--set", "txt_split=paragraph")[0] == 0
    recs = list(read_docs_artifact(out))
    assert [r["id"] for r in recs] == [f"{src}:1", f"{src}:4", f"{src}:6"]
    assert [r["text"] for r in recs][2] == "third"
    out2 = tmp_path / "o2"
    shutil.copy(DATA / "botchan_excerpt.txt", tmp_path / "book.txt")
    assert clean(tmp_path / "book.txt", "--out", out2, *args, "--quiet")[0] == 0
    (book,) = read_docs_artifact(out2)
    assert book["text"].startswith("Produced by David Starner")
    assert open_artifact(out2, "docs").stats["steps"]["normalize.gutenberg_stripped"] == 1


def test_parquet_and_zst_and_docs_artifact_inputs(web_docs: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = (DATA / "c4_demo.jsonl").read_bytes().splitlines()[:6]
    texts = [json.loads(x)["text"] for x in lines]
    pq.write_table(pa.table({"body": texts, "n": list(range(6))}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(b"\n".join(lines) + b"\n")
    )
    out_pq, out_zst = tmp_path / "pq", tmp_path / "zst"
    assert clean(tmp_path / "a.parquet", "--out", out_pq, "--text-field", "body", "-q")[0] == 0
    assert clean(tmp_path / "b.jsonl.zst", "--out", out_zst, "-q")[0] == 0
    a, b = list(read_docs_artifact(out_pq)), list(read_docs_artifact(out_zst))
    assert len(a) == len(b) > 0
    assert [r["text"] for r in a] == [r["text"] for r in b]
    assert {r["n"] for r in a} <= set(range(6))  # other parquet columns kept as metadata
    again = tmp_path / "again"
    assert clean(web_docs, "--out", again, "-q")[0] == 0  # a docs artifact is an input too
    assert [r["text"] for r in read_docs_artifact(again)] == [
        r["text"] for r in read_docs_artifact(web_docs)
    ]


# --- bad input -------------------------------------------------------------------------------


def bad_inputs(folder: Path) -> None:
    good = json.loads((DATA / "c4_demo.jsonl").read_text().splitlines()[0])["text"][:200]
    rows = [
        json.dumps({"text": good}).encode(),
        b'{"text": "unterminated',
        b'{"text": "caf\xe9 latin-1"}',
        b'{"text": "half a pair \\ud800 here"}',
        b'{"text": 42}',
        b'{"title": "no text"}',
        b"[1, 2]",
        json.dumps({"text": "x" * 500}).encode(),
    ]
    (folder / "a.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    lines = (DATA / "c4_demo.jsonl").read_text().splitlines()
    varied = [json.dumps({"text": json.loads(x)["text"][:250]}).encode() for x in lines]
    full = gzip.compress(b"\n".join(varied) + b"\n")
    (folder / "b.jsonl.gz").write_bytes(full[: len(full) // 2])
    (folder / "c.jsonl").write_bytes(b"")


def test_bad_input_is_skipped_counted_and_kept_aside(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    bad_inputs(inp)
    out = tmp_path / "o"
    code, msg = clean(inp, "--out", out, "--set", "max_line_bytes=300", "--workers", "2")
    assert code == 0, msg
    errs = errors(out)
    where = {(Path(e["file"]).name, e["line"]): e["reason"] for e in errs}
    assert where == {
        ("a.jsonl", 2): "bad_json",
        ("a.jsonl", 3): "invalid_utf8",
        ("a.jsonl", 4): "lone_surrogate",
        ("a.jsonl", 5): "text_not_string",
        ("a.jsonl", 6): "missing_text",
        ("a.jsonl", 7): "not_an_object",
        ("a.jsonl", 8): "line_too_long",
        ("b.jsonl.gz", where_truncated(errs)): "truncated_file",
        ("c.jsonl", 0): "empty_file",
    }
    s = open_artifact(out, "docs").stats
    assert s["malformed"] == 9
    assert s["malformed_by_reason"]["bad_json"] == 1
    assert s["docs_in"] >= 2  # the good row and the complete lines of the truncated file
    assert "malformed" in msg and "truncated_file" in msg


def where_truncated(errs: list[dict]) -> int:
    return next(e["line"] for e in errs if e["reason"] == "truncated_file")


def test_strict_fails_at_first_bad_record_with_file_line(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    bad_inputs(inp)
    out = tmp_path / "o"
    code, msg = clean(inp, "--out", out, "--strict")
    assert code == 2
    assert f"{inp / 'a.jsonl'}:2: bad_json" in msg.replace("\n", "")
    assert not out.exists() and not any(tmp_path.glob(".o.partial"))


def test_missing_and_empty_inputs_exit_2(tmp_path: Path) -> None:
    code, msg = clean(tmp_path / "nope.jsonl", "--out", tmp_path / "o")
    assert code == 2 and "nope.jsonl" in msg and "no such file" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("not an input type")
    code, msg = clean(empty, "--out", tmp_path / "o")
    assert code == 2 and "no input documents" in msg
    assert not (tmp_path / "o").exists()


def test_unreadable_folder_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    (locked / "sub").mkdir(parents=True)
    (locked / "sub" / "a.jsonl").write_text('{"text": "x"}\n')
    if os.geteuid() == 0:  # root reads anything: make the listing fail as it would for a user
        monkeypatch.setattr(os, "scandir", _scandir_denying(locked / "sub"))
    else:
        (locked / "sub").chmod(0)
    try:
        code, msg = clean(locked, "--out", tmp_path / "o")
    finally:
        (locked / "sub").chmod(0o755)
    assert code == 2 and "not readable" in msg and "locked" in msg


def _scandir_denying(path: Path):  # type: ignore[no-untyped-def]
    real = os.scandir

    def scandir(p=".") -> object:  # type: ignore[no-untyped-def]
        if Path(os.fsdecode(p)) == path:
            raise PermissionError(13, "Permission denied", str(p))
        return real(p)

    return scandir


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "x"}\n')
    code, msg = clean(src, "--out", tmp_path / "o", "--set", "c4.min_sentences=3")
    assert code == 2 and "c4.min_sentences" in msg
    code, msg = clean(src, "--out", tmp_path / "o", "--set", "language.threshold=high")
    assert code == 2 and "language.threshold" in msg
    code, msg = clean(src, "--out", tmp_path / "o", "--set", "workers=-1")
    assert code == 2 and "workers" in msg


def test_existing_out_needs_force(web_docs: Path, tmp_path: Path) -> None:
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "x"}\n')
    out = tmp_path / "o"
    assert clean(src, "--out", out, "-q")[0] == 0
    code, msg = clean(src, "--out", out, "-q")
    assert code == 2 and "--force" in msg
    assert clean(src, "--out", out, "-q", "--force")[0] == 0
