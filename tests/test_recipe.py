"""The full build as users run it: `make -f recipes/build.mk` on the bundled corpus.

Runs the real chain (clean → dedup → tokenize → pretrain → eval → generate, and pretrain →
finetune → generate --chat, and pretrain → lora → generate --adapter --chat) with the `tiny`
preset, then checks what make promises: every stage's artifact is complete and names its
input, a second `make` rebuilds nothing, and a deleted stage is rebuilt alone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmctl.artifacts import open_artifact

REPO = Path(__file__).resolve().parent.parent
LLMCTL = str(Path(sys.executable).with_name("llmctl"))
STAGES = {"clean": "docs", "dedup": "docs", "tokens": "tokens", "model": "checkpoint",
          "sft": "checkpoint"}  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("make") is None, reason="needs make"),
]


def _make(out: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["make", "-f", "recipes/build.mk", "PRESET=tiny", f"OUT={out}", f"LLMCTL={LLMCTL}"]
    return subprocess.run(
        [*cmd, *targets], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )


def test_tiny_recipe_builds_every_stage_and_reruns_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _make(out, "all")

    arts = {name: open_artifact(out / name, kind) for name, kind in STAGES.items()}
    assert arts["dedup"].data["inputs"]["input-0"]["digest"] == arts["clean"].digest
    assert arts["tokens"].data["inputs"]["input-0"]["digest"] == arts["dedup"].digest
    assert arts["clean"].stats["docs_in"] > arts["clean"].stats["docs_kept"] > 0

    samples = open_artifact(out / "samples", "samples")
    rows = [json.loads(line) for line in (samples.path / "samples.jsonl").open()]
    assert len(rows) == 2 and all(r["completion_tokens"] == 32 for r in rows)

    figures = json.loads((out / "eval.json").read_text())
    assert figures["loss"] > 0 and figures["bits_per_byte"] > 0
    val_loss = arts["model"].stats["val_loss"]
    assert abs(figures["loss"] - val_loss) < 0.5  # same model, full val split vs sampled batches

    # finetune on the bundled instruction data: held-out loss below the base's, then a chat
    sft = arts["sft"]
    assert sft.data["inputs"]["checkpoint"]["digest"] == arts["model"].digest
    assert sft.stats["val_loss"] < sft.stats["base_val_loss"] - 1.0
    assert sft.stats["examples"] == 266 and sft.stats["rejected_total"] == 0
    chat = open_artifact(out / "chat", "samples")
    (row,) = [json.loads(line) for line in (chat.path / "samples.jsonl").open()]
    assert row["prompt"] == "Who are you?" and row["finish_reason"] in ("stop", "length")
    lora = open_artifact(out / "lora", "adapter")
    assert lora.data["inputs"]["checkpoint"]["digest"] == arts["model"].digest
    assert lora.stats["val_loss"] < lora.stats["base_val_loss"] - 1.0
    assert lora.stats["examples"] == 266 and lora.stats["trainable_share"] < 0.15
    (row,) = [json.loads(line) for line in (out / "lora-chat" / "samples.jsonl").open()]
    assert row["prompt"] == "Who are you?" and row["finish_reason"] in ("stop", "length")

    rerun = _make(out, "all")
    assert "llmctl" not in rerun.stdout  # everything up to date

    shutil.rmtree(out / "samples")
    rebuilt = _make(out, "all")
    assert "llmctl generate" in rebuilt.stdout
    assert "llmctl pretrain" not in rebuilt.stdout
