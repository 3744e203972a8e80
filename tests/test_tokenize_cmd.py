"""`llmctl tokenize` end to end on a real text slice: files, stats, splits, determinism, reuse."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from llmctl.artifacts import building, open_artifact
from llmctl.cli import app
from llmctl.data.corpus import SplitRule
from llmctl.data.docs import Doc, ReadOptions, iter_docs
from llmctl.data.docs import ShardWriter as DocsWriter
from llmctl.data.tokens import TokenStream, read_header, read_shard
from llmctl.tokenizer import (
    EOS_ID,
    decode,
    encode,
    encode_prompt,
    load_tokenizer,
    plain_text_tokenizer,
)

DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
FILES = {
    "manifest.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "train-00000.bin",
    "val-00000.bin",
    "rejected/errors.jsonl",
}


def tokenize(*args: str | Path) -> str:
    result = CliRunner().invoke(app, ["tokenize", *map(str, args), "--quiet"])
    assert result.exit_code == 0, result.output
    return result.output


def fails(*args: str | Path) -> str:
    result = CliRunner().invoke(app, ["tokenize", *map(str, args), "--quiet"])
    assert result.exit_code == 2, result.output
    return " ".join(result.output.split())


def files_of(art: Path) -> set[str]:
    return {p.relative_to(art).as_posix() for p in art.rglob("*") if p.is_file()}


def docs_in(art: Path, split: str) -> list[str]:
    """The documents of a split, decoded from the shards and cut at each eos."""
    tok = load_tokenizer(art)
    ids = np.concatenate([read_shard(p) for p in sorted(art.glob(f"{split}-*.bin"))]).tolist()
    docs, cur = [], []
    for i in ids:
        if i == EOS_ID:
            docs.append(decode(tok, cur))
            cur = []
        else:
            cur.append(i)
    assert cur == []  # every split ends with an eos
    return docs


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("tok")
    arts = {}
    for workers in (1, 2):
        arts[workers] = root / f"w{workers}"
        tokenize(DATA, "--out", arts[workers], "--vocab-size", "512", "--workers", workers,
                 "--set", "txt_split=paragraph", "--shard-tokens", "20000")  # fmt: skip
    return arts


def test_artifact_files_stats_and_headers(built: dict[int, Path]) -> None:
    art = built[1]
    m = open_artifact(art, "tokens")
    shards = [f"train-0000{i}.bin" for i in range(m.stats["tokens"]["train"] // 20000 + 1)]
    assert files_of(art) == FILES - {"train-00000.bin"} | set(shards)
    assert m.stats["shards"] == {"train": shards, "val": ["val-00000.bin"]}
    docs = [d.text for d in iter_docs([DATA], ReadOptions(txt_split="paragraph"))]
    s = m.stats
    assert s["docs"]["train"] + s["docs"]["val"] == len(docs) == 343
    assert s["val_split"] == "by text hash"
    assert s["vocab_size"] == 512 and s["dtype"] == "uint16" and s["eos_id"] == EOS_ID
    assert s["tokenizer"]["trained"] and s["tokenizer"]["share_of_train_text"] == 1.0
    assert s["text_bytes"] == sum(len(d.encode()) for d in docs)
    for split in ("train", "val"):
        headers = [read_header(art / n) for n in s["shards"][split]]
        assert sum(h.count for h in headers) == s["tokens"][split]
        assert sum(h.docs for h in headers) == s["docs"][split]
        assert {(h.vocab_size, h.eos_id, h.itemsize) for h in headers} == {(512, EOS_ID, 2)}
    text_tokens = s["tokens"]["train"] + s["tokens"]["val"] - len(docs)
    assert s["bytes_per_token"] == round(s["text_bytes"] / text_tokens, 4)
    assert 2.0 < s["bytes_per_token"] < 3.0
    assert (art / "rejected" / "errors.jsonl").read_text() == ""


def test_same_bytes_for_any_worker_count(built: dict[int, Path]) -> None:
    one, two = (open_artifact(built[w], "tokens") for w in (1, 2))
    assert one.files == two.files
    assert one.digest == two.digest


def test_val_holds_whole_documents_and_none_from_train(built: dict[int, Path]) -> None:
    docs = [d.text for d in iter_docs([DATA], ReadOptions(txt_split="paragraph"))]
    rule = SplitRule(val_fraction=0.01, seed=0)
    train, val = docs_in(built[2], "train"), docs_in(built[2], "val")
    # Each split holds its documents whole, in input order, chosen by the text-hash rule.
    assert train == [d for d in docs if rule.split_of(d) == "train"]
    assert val == [d for d in docs if rule.split_of(d) == "val"]
    assert 0 < len(val) < 20
    assert not set(val) & set(train)


def test_reusing_the_tokenizer_gives_identical_ids(built: dict[int, Path], tmp_path: Path) -> None:
    for source in (built[1], built[1] / "tokenizer.json"):
        out = tmp_path / source.name
        tokenize(DATA, "--out", out, "--tokenizer", source, "--set", "txt_split=paragraph",
                 "--shard-tokens", "20000", "--vocab-size", "999")  # fmt: skip
        m, orig = open_artifact(out, "tokens"), open_artifact(built[1], "tokens")
        assert m.files == orig.files
        assert m.stats["tokenizer"] == {"trained": False, "source": str(source)}
        assert m.data["inputs"]["tokenizer"]["path"] == str(built[1] / "tokenizer.json")


def test_token_stream_reads_the_artifact(built: dict[int, Path]) -> None:
    stream = TokenStream(built[1], "train", batch_size=4, seq_len=64, seed=0)
    xy = stream.sample(0)
    assert xy.shape == (4, 65) and xy.max() < 512
    val_tokens = open_artifact(built[1], "tokens").stats["tokens"]["val"]
    val = list(TokenStream(built[1], "val", batch_size=2, seq_len=8).sequential())
    assert sum(len(b) for b in val) == (val_tokens - 1) // 8


@pytest.mark.slow  # importing transformers takes seconds
def test_transformers_loads_the_artifact(built: dict[int, Path]) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(built[1])
    text = DATA.read_text()[:1000]
    tok = load_tokenizer(built[1])
    assert hf(text)["input_ids"] == encode_prompt(tok, text) == [1, *encode(tok, text)]
    assert hf(text, add_special_tokens=False)["input_ids"] == encode(tok, text)


def test_single_document_gives_val_its_tail(built: dict[int, Path], tmp_path: Path) -> None:
    out = tmp_path / "one"
    tokenize(DATA, "--out", out, "--tokenizer", built[1], "--val-fraction", "0.05")
    m = open_artifact(out, "tokens")
    tok = plain_text_tokenizer(load_tokenizer(built[1]))
    ids = encode(tok, DATA.read_text())
    moved = math.ceil(len(ids) * 0.05)
    assert m.stats["val_split"] == f"last {moved:,} tokens of the last document"
    assert read_shard(out / "train-00000.bin").tolist() == [*ids[:-moved], EOS_ID]
    assert read_shard(out / "val-00000.bin").tolist() == [*ids[-moved:], EOS_ID]
    assert m.stats["docs"] == {"train": 1, "val": 1}


def write_docs_artifact(out: Path, texts: list[str]) -> Path:
    with building(out, kind="docs", command="test", config={}) as art, DocsWriter(art.dir) as w:
        for i, t in enumerate(texts):
            w.write(Doc(f"d{i}", t, "test").to_record())
    return out


def test_docs_artifact_input_bad_records_and_special_text(tmp_path: Path) -> None:
    paras = [p for p in DATA.read_text().split("\n\n") if p.strip()]
    docs = write_docs_artifact(tmp_path / "docs", [*paras[:150], "say <|eos|> or <|end|>", ""])
    raw = tmp_path / "raw.jsonl"
    raw.write_text('{"text": "fine"}\n{bad json\n{"content": "x"}\n{"text": "lone \\ud800"}\n')
    out = tmp_path / "tok"
    tokenize(docs, raw, "--out", out, "--vocab-size", "300", "--val-fraction", "0.05", "-j", "2")
    m = open_artifact(out, "tokens")
    assert m.stats["bad_records"] == {"bad_json": 1, "lone_surrogate": 1, "missing_text": 1}
    assert m.stats["empty_docs"] == 1
    assert m.stats["docs"]["train"] + m.stats["docs"]["val"] == 152
    assert set(m.data["inputs"]) == {"input-0", "input-1"}
    assert m.data["inputs"]["input-0"]["kind"] == "docs"
    errors = [json.loads(x) for x in (out / "rejected" / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["reason"]) for e in errors] == [
        (2, "bad_json"),
        (3, "missing_text"),
        (4, "lone_surrogate"),
    ]
    # Special-token text inside a document stays text: eos appears only between documents.
    assert "say <|eos|> or <|end|>" in docs_in(out, "train") + docs_in(out, "val")
    strict = fails(docs, raw, "--out", tmp_path / "strict", "--strict", "--vocab-size", "300")
    assert "raw.jsonl:2: bad_json" in strict
    assert not (tmp_path / "strict").exists()


def test_usage_errors(built: dict[int, Path], tmp_path: Path) -> None:
    assert "already exists" in fails(DATA, "--out", built[1])
    assert "vocab_size must be at least 265" in fails(
        DATA, "--out", tmp_path / "a", "--vocab-size", "100"
    )
    assert "val_fraction must be in [0, 1)" in fails(
        DATA, "--out", tmp_path / "b", "--val-fraction", "1.5"
    )
    assert "input.txt: not a valid tokenizer.json" in fails(
        DATA, "--out", tmp_path / "c", "--tokenizer", DATA
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    assert "no documents to tokenize" in fails(
        empty, "--out", tmp_path / "d", "--tokenizer", built[1]
    )
    assert "unknown config key 'vocab'" in fails(DATA, "--out", tmp_path / "e", "--set", "vocab=3")
    edited = tmp_path / "edited"
    shutil.copytree(built[1], edited)
    with open(edited / "tokenizer.json", "a") as f:
        f.write(" ")
    assert "tokenizer.json: size differs from the manifest" in fails(
        DATA, "--out", tmp_path / "f", "--tokenizer", edited
    )
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial dirs left
