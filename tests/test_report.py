"""`llmctl report`: every section present, figures equal to the manifests they come from,
PNGs that decode, HTML that parses with every tag closed, nothing fetched at view time, and the
align figures (preference, RL) shown when a manifest carries them."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.artifacts import building, open_artifact
from llmctl.cli import app
from llmctl.report import SECTIONS

# one worker builds the short chain once for both modules
pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.xdist_group("short-chain"),
]
runner = CliRunner()
VOID = {"meta", "img", "br", "hr", "link", "input"}


class StrictParser(HTMLParser):
    """html.parser with the errors it tolerates made fatal: unclosed or mismatched tags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.ids: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(str(a["id"]))
        if tag == "img":
            self.images.append(str(a["src"]))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()


def report(*args: object) -> tuple[int, str]:
    r = runner.invoke(app, ["report", *map(str, args), "-q"])
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stderr


def test_the_report_holds_every_section_from_the_manifests(
    short_chain: dict[str, Path], tmp_path: Path
) -> None:
    c = short_chain
    code, err = report(c["ev"], c["q8"], c["s"], "--out", tmp_path / "r")
    assert code == 0, err
    art = open_artifact(tmp_path / "r", "report")
    assert sorted(art.files) == ["report.html", "report.json"]
    figures = json.loads((tmp_path / "r" / "report.json").read_text())
    assert tuple(figures) == SECTIONS and art.stats["sections"] == list(SECTIONS)

    clean = open_artifact(c["clean"], "docs").stats
    stages = {s["stage"]: s for s in figures["funnel"]["stages"]}
    assert (stages["raw"]["docs"], stages["clean"]["docs"]) == (clean["docs_in"],
                                                                clean["docs_kept"])  # fmt: skip
    assert sum(r["docs"] for r in figures["funnel"]["drop_reasons"].values()) == (
        clean["docs_in"] - clean["docs_kept"])  # fmt: skip
    (tok,) = figures["tokenizer"]
    assert tok["vocab_size"] == 300

    (train,) = figures["training"]
    assert [s for s, _ in train["train"]] == [1, 2, 3, 4] and [s for s, _ in train["val"]] == [2, 4]

    rows = {r["path"]: r for r in figures["evals"]}
    ev = open_artifact(c["ev"], "eval").stats
    assert rows[str(c["model"])]["val_bits_per_byte"] == ev["bits_per_byte"]
    assert rows[str(c["model"])]["role"] == "base"
    q = open_artifact(c["q8"], "checkpoint").stats["report"]["after"]
    assert rows[str(c["q8"])]["val_bits_per_byte"] == q["bits_per_byte"]
    assert rows[str(c["q8"])]["decode_tokens_per_s"] == q["decode_tokens_per_s"]
    assert rows[str(c["q8"])]["role"] == "quantized (int8)"
    assert rows[str(c["q8"])]["file_bytes"] < rows[str(c["model"])]["file_bytes"]
    assert figures["preference"] == []
    (group,) = figures["samples"]
    assert group["prompt"] == "The" and len(group["by"]) == 1

    page = (tmp_path / "r" / "report.html").read_text()
    p = StrictParser()
    p.feed(page)
    p.close()
    assert p.stack == ["html"] or p.stack == [], p.stack
    assert set(SECTIONS) <= set(p.ids)
    assert len(p.images) == len(art.stats["images"]) >= 4  # funnel, drops, loss, evals
    for src in p.images:
        head, b64 = src.split(",", 1)
        assert head == "data:image/png;base64"
        png = base64.b64decode(b64, validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        assert matplotlib.image.imread(io.BytesIO(png)).ndim == 3
    # one self-contained page: nothing the browser would fetch
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert "<script" not in page and "no align stage in this build" in page


def test_align_figures_appear_when_a_manifest_carries_them(
    short_chain: dict[str, Path], tmp_path: Path
) -> None:
    """What the align stages will record (stats.preference, stats.rl) is shown as it is."""
    pref = {"accuracy": 0.75, "margin": 1.5, "chosen_logp": -10.0, "rejected_logp": -11.5,
            "kl": 0.02, "base_accuracy": 0.5, "pairs": 64, "cut": 1, "rejected": 0}  # fmt: skip
    rl = {"reward_before": 0.1, "reward_after": 0.4, "kl": 0.05, "steps": 8, "method": "grpo"}
    model = short_chain["model"]
    with building(tmp_path / "dpo", kind="checkpoint", command="align", config={},
                  inputs={"checkpoint": model}) as art:  # fmt: skip
        for name in ("model.safetensors", "config.json", "tokenizer.json",
                     "tokenizer_config.json"):  # fmt: skip
            shutil.copyfile(model / name, art.dir / name)
        art.stats.update(preference=pref, rl=rl)
    code, err = report(tmp_path / "dpo", "--out", tmp_path / "r", "--set", "eval_tokens=64")
    assert code == 0, err
    figures = json.loads((tmp_path / "r" / "report.json").read_text())
    (row,) = figures["preference"]
    assert (row["preference"], row["rl"]) == (pref, rl)
    evals = {r["path"]: r for r in figures["evals"]}
    aligned = evals[str(tmp_path / "dpo")]
    assert (
        aligned["role"] == "aligned" and aligned["bpb_source"] == "report (63 tok)"
    )  # 64 ids, 63 predicted
    # the same weights as the base, scored the same way: the same bits per byte
    base = evals[str(model)]
    assert aligned["val_bits_per_byte"] == base["val_bits_per_byte"]
    page = (tmp_path / "r" / "report.html").read_text()
    assert "grpo" in page and "0.75" in page and "no align stage" not in page
