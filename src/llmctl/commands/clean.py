"""`llmctl clean`: raw text in, a `docs` artifact of cleaned documents out.

Reads .txt/.jsonl(.gz/.zst)/.parquet/.html/.warc(.gz) files, folders of them and `docs`
artifacts; runs the cleaning chain of `llmctl.data.filters` in worker processes; writes
`shard-NNNNN.jsonl.gz` (kept), `rejected/dropped-NNNNN.jsonl.gz` (each dropped document with
its `step` and `reason`) and `rejected/errors.jsonl` (malformed records with file:line).

Example:
    cfg = load_config(CleanConfig, overrides=["language.keep=['en','fr']"])
    run([Path("crawl/")], Path("out/docs"), cfg)
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.artifacts import Manifest, building, open_artifact
from llmctl.config import helpful, nested, to_dict
from llmctl.data.docs import (
    BadRecord,
    ErrorLog,
    Raw,
    ReadOptions,
    ShardWriter,
    batched,
    iter_raw,
    parse_raw,
    resolve_inputs,
)
from llmctl.data.engine import EngineConfig, open_engine
from llmctl.data.filters import (
    STEPS,
    C4Config,
    Chain,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    NormalizeConfig,
    PIIConfig,
    build_chain,
)
from llmctl.runtime import human_bytes, progress, summary


@dataclass(frozen=True)
class CleanConfig(ReadOptions):
    """Settings of `llmctl clean`; each step can be tuned or switched off (`STEP.enabled`)."""

    workers: int = helpful(0, "worker processes, 0 = all cores (output is the same for any)")
    batch_docs: int = helpful(128, "records per batch handed to a worker (or Ray task)")
    engine: EngineConfig = nested(EngineConfig, "where the batches run: local pool or Ray")
    normalize: NormalizeConfig = nested(NormalizeConfig, "1. Unicode and whitespace repair")
    language: LanguageConfig = nested(LanguageConfig, "2. fastText language id")
    gopher_repetition: GopherRepetitionConfig = nested(GopherRepetitionConfig, "3. repetition")
    gopher_quality: GopherQualityConfig = nested(GopherQualityConfig, "4. Gopher quality")
    c4: C4Config = nested(C4Config, "5. C4 line and document rules")
    fineweb: FineWebConfig = nested(FineWebConfig, "6. FineWeb quality")
    pii: PIIConfig = nested(PIIConfig, "7. e-mail and IP replacement")

    def __post_init__(self) -> None:
        if self.workers < 0 or self.batch_docs < 1:
            raise ValueError("workers must be >= 0 and batch_docs >= 1")


# Per worker process: the chain (with its fastText model) is built once, in `_init`.
_chain: Chain | None = None
_opts: CleanConfig | None = None


def _init(cfg: CleanConfig) -> None:
    global _chain, _opts
    _chain, _opts = build_chain(cfg), cfg


def _clean_batch(batch: list[Raw | BadRecord]) -> tuple[list[tuple[Any, ...]], dict[str, int]]:
    """Parse and clean one batch: ('keep'|'drop', bytes in, record) or ('bad', BadRecord)."""
    assert _chain is not None and _opts is not None
    out: list[tuple[Any, ...]] = []
    for item in batch:
        doc = parse_raw(item, _opts) if isinstance(item, Raw) else item
        if isinstance(doc, BadRecord):
            out.append(("bad", doc))
            continue
        size = len(doc.text.encode("utf-8"))
        verdict = _chain(doc)
        record = doc.to_record()
        if verdict is None:
            out.append(("keep", size, record))
        else:
            record["step"], record["reason"] = verdict
            out.append(("drop", size, record))
    return out, _chain.take_counts()


def run(inputs: list[Path], out: Path, cfg: CleanConfig, force: bool = False) -> Manifest:
    """Clean `inputs` into the docs artifact `out`; returns its manifest."""
    files = resolve_inputs(inputs)
    kept_docs = dropped_docs = bytes_in = bytes_out = 0
    drops: dict[tuple[str, str], list[int]] = {}
    counts: Counter[str] = Counter()
    with (
        open_engine(cfg.engine, cfg.workers) as engine,
        building(
            out, kind="docs", command="clean", config=to_dict(cfg), inputs=list(inputs), force=force
        ) as art,
    ):
        t0 = time.perf_counter()  # after the engine is up: Ray's start-up is not the stage's
        rejected = art.dir / "rejected"
        with (
            ShardWriter(art.dir) as kept,
            ShardWriter(rejected, prefix="dropped") as dropped,
            ErrorLog(rejected / "errors.jsonl", cfg.strict) as errors,
            progress("clean", unit="docs") as bar,
        ):
            batches = batched(iter_raw(files, cfg), cfg.batch_docs)
            for results, step_counts in engine.map(_clean_batch, batches, _init, (cfg,)):
                counts.update(step_counts)
                for kind, *rest in results:
                    if kind == "bad":
                        errors.add(rest[0])
                        continue
                    size, record = rest
                    bytes_in += size
                    if kind == "keep":
                        kept.write(record)
                        kept_docs += 1
                        bytes_out += len(record["text"].encode("utf-8"))
                    else:
                        dropped.write(record)
                        dropped_docs += 1
                        tally = drops.setdefault((record["step"], record["reason"]), [0, 0])
                        tally[0] += 1
                        tally[1] += size
                bar.advance(len(results), kept=kept_docs, dropped=dropped_docs)
        seconds = time.perf_counter() - t0
        art.stats.update(
            _stats(files, kept_docs, dropped_docs, bytes_in, bytes_out, drops, errors.counts)
        )
        art.stats["steps"] = dict(sorted(counts.items()))
        art.stats.update(workers=engine.workers, seconds=round(seconds, 3))
        art.stats["mb_per_s"] = round(bytes_in / 1e6 / max(seconds, 1e-9), 3)
    _print_summary(out, art.stats, engine.name)
    return open_artifact(out, "docs", verify=False)


def _stats(
    files: list[Path],
    kept: int,
    dropped: int,
    bytes_in: int,
    bytes_out: int,
    drops: dict[tuple[str, str], list[int]],
    malformed: dict[str, int],
) -> dict[str, Any]:
    order = list(STEPS)
    by_reason = sorted(drops.items(), key=lambda kv: (order.index(kv[0][0]), -kv[1][0], kv[0][1]))
    return {
        "input_files": len(files),
        "input_bytes": sum(f.stat().st_size for f in files if f.is_file()),
        "docs_in": kept + dropped,
        "docs_kept": kept,
        "docs_dropped": dropped,
        "malformed": sum(malformed.values()),
        "malformed_by_reason": dict(sorted(malformed.items())),
        "text_bytes_in": bytes_in,
        "text_bytes_out": bytes_out,
        "dropped_by_reason": {
            reason: {"step": step, "docs": n, "bytes": b} for (step, reason), (n, b) in by_reason
        },
    }


def _pct(n: int, total: int) -> str:
    return f"{n:,} ({100 * n / max(total, 1):.1f}%)"


def _print_summary(out: Path, s: dict[str, Any], engine: str = "local") -> None:
    steps, n = s["steps"], s["docs_in"]
    rows: list[tuple[str, Any]] = [
        ("inputs", f"{s['input_files']} files, {human_bytes(s['input_bytes'])}"),
        ("documents in", n),
        ("malformed (rejected/errors.jsonl)", s["malformed"]),
    ]
    rows += [(f"  {reason}", c) for reason, c in s["malformed_by_reason"].items()]
    rows += [("kept", _pct(s["docs_kept"], n)), ("dropped (rejected/)", _pct(s["docs_dropped"], n))]
    rows += [(f"  {d['step']}: {r}", _pct(d["docs"], n)) for r, d in s["dropped_by_reason"].items()]
    rows += [
        ("C4 lines removed", steps.get("c4.lines_removed", 0)),
        (
            "PII replaced (e-mails, IPs)",
            f"{steps.get('pii.emails', 0):,}, {steps.get('pii.ips', 0):,}",
        ),
        ("Gutenberg boilerplate cut", steps.get("normalize.gutenberg_stripped", 0)),
        (
            "text in -> out",
            f"{human_bytes(s['text_bytes_in'])} -> {human_bytes(s['text_bytes_out'])}",
        ),
        ("time", f"{s['seconds']:.1f} s, {s['workers']} workers ({engine})"),
        ("throughput", f"{s['mb_per_s']:.2f} MB/s ({s['mb_per_s'] / s['workers']:.2f} per worker)"),
    ]
    summary(f"clean -> {out}", rows)
