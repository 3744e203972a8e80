"""Config resolution: defaults < --config TOML < typed options < --set, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import app
from llmctl.commands.clean import CleanConfig
from llmctl.config import load_config, to_dict
from llmctl.errors import UsageError

runner = CliRunner()


def invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [*map(str, args)], env={"COLUMNS": "300"})
    return result.exit_code, result.output + (result.stderr or "")


@pytest.fixture
def toml(tmp_path: Path) -> Path:
    path = tmp_path / "clean.toml"
    path.write_text(
        'workers = 3\ntext_field = "body"\n'
        "[language]\nthreshold = 0.5\nkeep = ['en', 'fr']\n"
        "[c4]\nmin_num_sentences = 4\n"
    )
    return path


def test_precedence_defaults_toml_options_set(toml: Path) -> None:
    d = CleanConfig()
    assert (d.workers, d.text_field, d.language.threshold, d.c4.min_num_sentences) == (
        0,
        "text",
        0.65,
        5,
    )
    t = load_config(CleanConfig, toml)
    assert (t.workers, t.text_field, t.language.keep, t.language.threshold) == (
        3,
        "body",
        ["en", "fr"],
        0.5,
    )
    assert t.c4.min_num_sentences == 4 and t.c4.filter_javascript is True  # nested defaults kept
    o = load_config(CleanConfig, toml, [], {"workers": 2, "text_field": "content", "strict": None})
    assert (o.workers, o.text_field, o.strict) == (2, "content", False)
    s = load_config(CleanConfig, toml, ["workers=1", "c4.min_num_sentences=7"], {"workers": 2})
    assert (s.workers, s.c4.min_num_sentences, s.language.threshold) == (1, 7, 0.5)
    assert to_dict(s)["c4"]["min_num_sentences"] == 7


def test_cli_show_config_reflects_every_layer(toml: Path, tmp_path: Path) -> None:
    code, out = invoke(
        "clean",
        tmp_path,
        "--config",
        toml,
        "--workers",
        "2",
        "--set",
        "language.threshold=0.9",
        "--show-config",
    )
    assert code == 0, out
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in out.splitlines()
        if line.count("│") >= 3
    }
    assert rows["workers"] == "2"
    assert rows["text_field"] == "'body'"
    assert rows["language.threshold"] == "0.9"
    assert rows["c4.min_num_sentences"] == "4"
    assert rows["gopher_quality.min_doc_words"] == "50"
    assert "non-symbol words" in out  # each field's help is shown
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # nothing was built


@pytest.mark.parametrize(
    ("item", "key"),
    [
        ("c4.min_sentences=3", "c4.min_sentences"),
        ("nope=1", "nope"),
        ("language.threshold=high", "language.threshold"),
        ("gopher_quality.min_doc_words=1.5", "gopher_quality.min_doc_words"),
        ("language.keep=en", "language.keep"),
        ("normalize.nfc=1", "normalize.nfc"),
        ("txt_split=sentence", "txt_split"),
    ],
)
def test_bad_set_exits_2_naming_the_key(item: str, key: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=key.replace(".", r"\.")):
        load_config(CleanConfig, None, [item])
    code, out = invoke("clean", tmp_path, "--out", tmp_path / "o", "--set", item)
    assert code == 2 and key in out
    assert not (tmp_path / "o").exists()


def test_bad_toml_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[c4]\nmin_num_sentence = 4\n")
    code, out = invoke("clean", tmp_path, "--config", bad, "--show-config")
    assert code == 2 and "c4.min_num_sentence" in out
    bad.write_text("workers = = 2\n")
    code, out = invoke("clean", tmp_path, "--config", bad, "--show-config")
    assert code == 2 and "bad.toml" in out and "TOML" in out
    code, out = invoke("clean", tmp_path, "--config", tmp_path / "missing.toml", "--show-config")
    assert code == 2 and "missing.toml" in out
