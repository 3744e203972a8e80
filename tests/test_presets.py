"""Every preset in recipes/ is complete for recipes/build.mk, and every TOML in it is valid for
the command that reads it: a missing stage or a mistyped key in a GPU recipe fails here, on
CPU, in seconds, not hours into a GPU run that CI never makes."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PRESETS = sorted(p.name for p in RECIPES.iterdir() if p.is_dir() and p.name != "data")
TOMLS = [(p, t.name) for p in PRESETS for t in sorted((RECIPES / p).glob("*.toml"))]


def command_of(stage: str) -> list[str]:
    """The llmctl command (and the flag the build passes beside --config) that reads a stage's
    TOML, as recipes/build.mk runs it."""
    if stage.startswith("quantize-"):
        return ["quantize"]
    if stage == "rlaif":
        return ["align", "--method", "rlaif"]
    if stage in ("dpo", "rm", "grpo"):
        return ["align"]
    return [stage]


def test_the_presets_are_the_ones_documented() -> None:
    assert PRESETS == ["gpt2-124m-gpu", "rwkv-tiny", "small", "small-gpu", "tiny"]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("preset", PRESETS)
def test_make_all_has_every_toml_it_needs_and_reads_every_toml(preset: str, tmp_path: Path) -> None:
    r = subprocess.run(
        ["make", "-n", "-f", "recipes/build.mk", f"PRESET={preset}", f"OUT={tmp_path}",
         "LLMCTL=llmctl", "all"],
        cwd=RECIPES.parent, capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr  # a missing TOML: "No rule to make target ...toml"
    read = set(re.findall(rf"--config recipes/{re.escape(preset)}/(\S+\.toml)", r.stdout))
    assert read == {t.name for t in (RECIPES / preset).glob("*.toml")}


@pytest.mark.parametrize(("preset", "toml"), TOMLS, ids=[f"{p}/{t}" for p, t in TOMLS])
def test_every_toml_resolves_with_its_command(preset: str, toml: str) -> None:
    path = RECIPES / preset / toml
    result = CliRunner().invoke(
        app, [*command_of(toml.removesuffix(".toml")), "--config", str(path), "--show-config"]
    )
    assert result.exit_code == 0, result.output
    assert "(resolved)" in result.output
