"""`llmctl eval`: loss, perplexity and bits per byte, checked on a model whose answer is known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from llmctl.artifacts import building
from llmctl.cli import app
from llmctl.data.tokens import read_shard, split_shards
from llmctl.model.gpt import GPT, preset
from llmctl.model.io import save_checkpoint
from llmctl.tokenizer import EOS_ID, encode, load_tokenizer

DATA = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
runner = CliRunner()


def tokenize(out: Path, vocab: int) -> Path:
    args = ["tokenize", str(DATA), "--out", str(out), "--vocab-size", str(vocab), "-q"]
    res = runner.invoke(app, [*args, "--val-fraction", "0.1"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tokenize(tmp_path_factory.mktemp("tok") / "tokens", 512)


@pytest.fixture(scope="module")
def uniform(tokens: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose logits are all zero: every next token has probability 1/V."""
    vocab = load_tokenizer(tokens).get_vocab_size()
    model = GPT(preset("tiny", vocab_size=vocab))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    out = tmp_path_factory.mktemp("ck") / "uniform"
    with building(out, kind="checkpoint", command="test", config={}) as art:
        files = {n: tokens / n for n in ("tokenizer.json", "tokenizer_config.json")}
        save_checkpoint(art.dir, model, files)
    return out


def evaluate(*args: str) -> dict:
    res = runner.invoke(app, ["eval", *args, "--json", "-q"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_uniform_model_on_the_val_split(tokens: Path, uniform: Path) -> None:
    tok = load_tokenizer(tokens)
    V = tok.get_vocab_size()
    ids = np.concatenate([read_shard(p) for p in split_shards(tokens, "val")]).astype(int)
    got = evaluate(str(uniform), str(tokens), "--seq-len", "48")
    assert got["tokens"] == len(ids) - 1
    assert got["loss"] == pytest.approx(math.log(V), abs=1e-6)
    assert got["perplexity"] == pytest.approx(V, rel=1e-5)
    # By hand: the text is ASCII, so each non-special target token is its own bytes.
    targets = [i for i in ids[1:] if i >= 8]
    n_bytes = sum(len(tok.decode([i]).encode()) for i in targets)
    assert got["text_tokens"] == len(targets) and got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(len(targets) * math.log2(V) / n_bytes, rel=1e-6)


def test_uniform_model_on_text_files(tokens: Path, uniform: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(tokens)
    V = tok.get_vocab_size()
    texts = ["To be, or not to be, that is the question.", "Whether 'tis nobler in the mind"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    got = evaluate(str(uniform), str(tmp_path / "0.txt"), str(tmp_path / "1.txt"))
    a, b = encode(tok, texts[0]), encode(tok, texts[1])
    assert got["tokens"] == len(a) + len(b) + 1  # both docs end in <|eos|>; the first is context
    assert got["text_tokens"] == len(a) - 1 + len(b)
    n_bytes = len(texts[0]) - len(tok.decode(a[:1])) + len(texts[1])
    assert got["bytes"] == n_bytes
    assert got["loss"] == pytest.approx(math.log(V), abs=1e-6)
    assert got["bits_per_byte"] == pytest.approx(got["text_tokens"] * math.log2(V) / n_bytes)
    assert EOS_ID == 1


def test_eval_refuses_tokens_of_another_tokenizer(uniform: Path, tmp_path: Path) -> None:
    other = tokenize(tmp_path / "other", 300)
    res = runner.invoke(app, ["eval", str(uniform), str(other)])
    assert res.exit_code == 2 and "different tokenizer" in res.output
    res = runner.invoke(app, ["eval", str(uniform), str(other), "--seq-len", "999"])
    assert res.exit_code == 2
