"""`llmctl report`: one self-contained HTML page of the build behind the given artifacts.

Walks each artifact's lineage (`llmctl.lineage`), gathers the figures its manifests and
metrics already hold (`llmctl.report`), scores on the val split any checkpoint that no eval or
quantize stage scored (capped at `eval_tokens`, `eval_missing = false` to skip), draws PNGs
with matplotlib and writes a `report` artifact: `report.html` (images embedded as base64,
nothing fetched at view time) and `report.json` (the same figures).

Example:
    llmctl report out/eval-model out/chat-sft out/q-int8 --out out/report
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.artifacts import building, open_artifact
from llmctl.config import helpful, to_dict
from llmctl.errors import UsageError
from llmctl.lineage import Node, walk
from llmctl.report import SECTIONS, gather, plots, render_html
from llmctl.runtime import is_quiet, set_quiet, summary, warn


@dataclass(frozen=True)
class ReportConfig:
    """Settings of `llmctl report`."""

    title: str = helpful("llmctl build report", "the page's title")
    eval_missing: bool = helpful(
        True, "score checkpoints no eval/quantize stage scored (val split, eval_tokens)"
    )
    eval_tokens: int = helpful(16384, "at most this many val tokens per missing score")

    def __post_init__(self) -> None:
        if self.eval_tokens < 2:
            raise UsageError("config key 'eval_tokens': must be >= 2")


def _score_missing(figures: dict[str, Any], nodes: list[Node], cfg: ReportConfig) -> None:
    """Fill val bits per byte of unscored checkpoints from the build's tokens artifact that
    shares their tokenizer (none: the row stays absent)."""
    from llmctl.commands.eval import EvalConfig
    from llmctl.commands.eval import run as evaluate

    tokens = [n for n in nodes if n.kind == "tokens" and n.status == "ok" and n.manifest]
    by_path = {n.path: n for n in nodes}
    for row in figures["evals"]:
        node = by_path.get(row["path"])
        if row["val_bits_per_byte"] is not None or node is None or node.status != "ok":
            continue
        tok_sha = node.manifest.files.get("tokenizer.json", {}).get("sha256")  # type: ignore[union-attr]
        match = [t for t in tokens
                 if t.manifest.files.get("tokenizer.json", {}).get("sha256") == tok_sha]  # type: ignore[union-attr]  # fmt: skip
        if not match:
            continue
        was = is_quiet()
        set_quiet(True)  # the report's summary speaks for these scores
        try:
            r = evaluate(node.manifest.path, [match[0].manifest.path],  # type: ignore[union-attr]
                         EvalConfig(max_tokens=cfg.eval_tokens))  # fmt: skip
        except UsageError as e:
            warn(f"{row['path']}: not scored ({e})")
            continue
        finally:
            set_quiet(was)
        row.update(val_bits_per_byte=r["bits_per_byte"], val_loss=r["loss"],
                   eval_tokens=r["tokens"], bpb_source=f"report ({r['tokens']:,} tok)")  # fmt: skip


def run(artifacts: list[Path], out: Path, cfg: ReportConfig, force: bool = False) -> dict:
    """Write the report artifact for `artifacts`; returns the figures."""
    started = time.time()  # the manifest's duration_s: tracing, scoring and plotting included
    for a in artifacts:
        open_artifact(a, ("docs", "tokens", "checkpoint", "adapter", "samples", "export",
                          "eval"), verify=False)  # fmt: skip
    nodes: list[Node] = []
    for a in artifacts:
        nodes.extend(walk(a))
    figures = gather(nodes)
    if cfg.eval_missing:
        _score_missing(figures, nodes, cfg)
    images = plots(figures)
    page = render_html(figures, images, cfg.title)
    with building(out, kind="report", command="report", config=to_dict(cfg),
                  inputs=list(artifacts), force=force, started=started) as art:  # fmt: skip
        (art.dir / "report.html").write_text(page, encoding="utf-8")
        (art.dir / "report.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
        art.stats.update(
            sections=list(SECTIONS), images=sorted(images), artifacts=len(figures["artifacts"]),
            checkpoints=len(figures["evals"]),
            flagged=sum(1 for a in figures["artifacts"] if a["status"] != "ok" or a["flagged"]),
            html_bytes=len(page.encode()),
        )  # fmt: skip
    summary(
        f"report {out}",
        [("artifacts traced", len(figures["artifacts"])), ("checkpoints", len(figures["evals"])),
         ("plots", len(images)), ("page", str(out / "report.html"))],
    )  # fmt: skip
    return figures
