"""Fixtures shared by several test modules."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: tiny models gain nothing from more, and shared CI cores lose a lot
    to spinning threads; subprocesses get OMP_NUM_THREADS=1 to match (same numerics)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def short_chain(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A short real chain on 40 C4 documents, built by the CLI in-process: raw.jsonl → clean
    → dedup → tokens → model (4 steps) → q8 (int8), ev (eval artifact), s (samples). For the
    lineage and report tests; the full recipe chain is tests/test_build.py's."""
    from typer.testing import CliRunner

    from llmctl.cli import app

    d = tmp_path_factory.mktemp("chain")
    shutil.copyfile(Path(__file__).parent / "data" / "dedup" / "c4_sample.jsonl", d / "raw.jsonl")
    runner = CliRunner()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for argv in (
            ["clean", d / "raw.jsonl", "--out", d / "clean", "-j", "1"],
            ["dedup", d / "clean", "--out", d / "dedup", "-j", "1"],
            ["tokenize", d / "dedup", "--out", d / "tokens", "--vocab-size", "300",
             "--val-fraction", "0.2", "-j", "1"],
            ["pretrain", d / "tokens", "--out", d / "model", "--preset", "tiny", "--steps", "4",
             "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--set", "log_every=1",
             "--set", "eval_every=2"],
            ["quantize", d / "model", "--out", d / "q8", "--method", "int8",
             "--set", "eval_tokens=64", "--set", "decode_tokens=2"],
            ["eval", d / "model", d / "tokens", "--out", d / "ev", "--device", "cpu"],
            ["generate", d / "model", "--prompt", "The", "--max-new-tokens", "4", "--out", d / "s",
             "--device", "cpu"],
        ):  # fmt: skip
            result = runner.invoke(app, [str(a) for a in argv] + ["-q"])
            assert result.exit_code == 0, (argv, result.output, result.exception)
    finally:
        torch.set_num_threads(n)
    return {name: d / name for name in ("raw.jsonl", "clean", "dedup", "tokens", "model", "q8",
                                        "ev", "s")}  # fmt: skip


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny causal LM built by the CLI: tiny shakespeare tokenized (vocab 512), then the
    `tiny` preset pretrained 20 steps. The starting policy of the online-RL and RLAIF tests."""
    from typer.testing import CliRunner

    from llmctl.cli import app

    data = Path(__file__).parent / "data" / "tinyshakespeare" / "input.txt"
    root = tmp_path_factory.mktemp("tiny_lm")
    tokens, model = root / "tokens", root / "model"
    runner = CliRunner()
    res = runner.invoke(app, ["tokenize", str(data), "--out", str(tokens), "--vocab-size", "512",
                              "--val-fraction", "0.1", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["pretrain", str(tokens), "--out", str(model), "--preset", "tiny",
                              "--steps", "20", "--set", "warmup=2", "--batch-size", "4",
                              "--seq-len", "32", "--device", "cpu", "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return model
