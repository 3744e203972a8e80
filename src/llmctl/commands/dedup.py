"""`llmctl dedup`: drop exact and near-duplicate documents (and, optionally, eval overlap).

Reads `docs` artifacts or raw inputs; writes a `docs` artifact whose kept documents carry
`cluster_id` and `cluster_size`, and whose `rejected/dropped-*.jsonl.gz` holds every removed
document with `reason`, `duplicate_of` (the kept twin's id, or the eval doc's id) and
`similarity`. Malformed records go to `rejected/errors.jsonl`.

Two passes, so texts are never all in memory. Pass 1 (workers, in input order) keeps only
compact arrays per document: exact key, MinHash signature, eval overlap. Then clusters are
found with numpy (`llmctl.data.dedup.plan_dedup`). Pass 2 streams the input again and writes.

Example:
    llmctl dedup out/clean --out out/dedup --set near.threshold=0.8 --decontaminate eval.jsonl
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmctl.artifacts import building
from llmctl.config import helpful, nested, to_dict
from llmctl.data import dedup as dd
from llmctl.data.dedup_ray import ray_near_pairs
from llmctl.data.docs import (
    WARC_SUFFIXES,
    BadRecord,
    Doc,
    ErrorLog,
    Raw,
    ReadOptions,
    ShardWriter,
    batched,
    iter_docs,
    iter_raw,
    parse_raw,
    resolve_inputs,
)
from llmctl.data.engine import EngineConfig, RayEngine, open_engine
from llmctl.data.pool import ordered_map
from llmctl.errors import UsageError
from llmctl.runtime import info, progress, summary, warn

BATCH_DOCS = 256


@dataclass(frozen=True)
class ExactConfig:
    enabled: bool = helpful(True, "drop docs whose simplified text equals an earlier doc's")


@dataclass(frozen=True)
class NearConfig:
    enabled: bool = helpful(True, "drop near duplicates found by MinHash LSH")
    num_perm: int = helpful(112, "MinHash permutations per signature")
    bands: int | None = helpful(None, "LSH bands (with rows; unset: 14, or chosen by threshold)")
    rows: int | None = helpful(None, "LSH rows per band (with bands; unset: 8, or chosen)")
    threshold: float | None = helpful(
        None, "Jaccard threshold; alone it picks bands×rows; unset: (1/bands)^(1/rows) ≈ 0.72"
    )
    ngram: int = helpful(5, "words per shingle (of the simplified text)")
    verify: bool = helpful(True, "keep only candidate pairs whose signature Jaccard ≥ threshold")
    keep: Literal["first", "longest"] = helpful("first", "which doc of a cluster stays")
    seed: int = helpful(1, "seed of the MinHash permutations (as datasketch's MinHash seed)")
    warn_cluster: float = helpful(0.01, "warn when one cluster holds more than this share of docs")

    def __post_init__(self) -> None:
        if self.num_perm < 1 or self.ngram < 1:
            raise ValueError("near.num_perm and near.ngram must be ≥ 1")


@dataclass(frozen=True)
class DecontamConfig:
    paths: list[str] = helpful(
        [], "eval docs (files, folders, docs artifacts) to decontaminate against"
    )
    ngram: int = helpful(
        13, "drop training docs sharing any word n-gram of this size with eval docs"
    )
    text_field: str = helpful("", "text field of the eval records (empty: same as text_field)")


@dataclass(frozen=True)
class DedupConfig(ReadOptions):
    """Settings of `llmctl dedup`."""

    exact: ExactConfig = nested(ExactConfig, "exact duplicates (same simplified text)")
    near: NearConfig = nested(NearConfig, "near duplicates (MinHash LSH over word shingles)")
    decontam: DecontamConfig = nested(DecontamConfig, "overlap with evaluation documents")
    workers: int = helpful(0, "signature worker processes, one core each (0 = all cores)")
    engine: EngineConfig = nested(EngineConfig, "where the per-block work runs: local pool or Ray")


_W: dict[str, Any] = {}


def _init(cfg: DedupConfig, index: dd.EvalIndex | None) -> None:
    _W.update(cfg=cfg, signer=dd.Signer(cfg.near.num_perm, cfg.near.seed, cfg.near.ngram, index))


def _parse(items: list[Raw | BadRecord]) -> list[Doc | BadRecord]:
    return [parse_raw(i, _W["cfg"]) if isinstance(i, Raw) else i for i in items]


def _sign(items: list[Raw | BadRecord]) -> tuple[list[BadRecord], list[str], np.ndarray, dd.Signed]:
    """Pass 1 task: bad records, doc ids, (chars, bytes) per doc, and signatures."""
    parsed = _parse(items)
    docs = [d for d in parsed if isinstance(d, Doc)]
    sizes = np.array([(len(d.text), len(d.text.encode())) for d in docs], np.int64).reshape(-1, 2)
    bad = [d for d in parsed if isinstance(d, BadRecord)]
    return bad, [d.id for d in docs], sizes, _W["signer"].sign([d.text for d in docs])


def _eval_index(cfg: DedupConfig) -> tuple[dd.EvalIndex | None, dict[str, int]]:
    """The n-gram index of the --decontaminate docs (malformed eval records are skipped)."""
    if not cfg.decontam.paths:
        return None, {}
    opts = ReadOptions(
        text_field=cfg.decontam.text_field or cfg.text_field,
        txt_split=cfg.txt_split,
        max_line_bytes=cfg.max_line_bytes,
    )
    docs = list(iter_docs(cfg.decontam.paths, opts))
    first_bad = next((d for d in docs if isinstance(d, BadRecord)), None)
    if cfg.strict and first_bad is not None:
        raise UsageError(f"{first_bad.where}: {first_bad.reason} (--decontaminate input)")
    index = dd.EvalIndex([(d.id, d.text) for d in docs if isinstance(d, Doc)], cfg.decontam.ngram)
    bad = len(docs) - len(index.ids)
    if bad:
        warn(f"--decontaminate: skipped {bad} malformed eval record(s)")
    if index.short:
        warn(
            f"--decontaminate: {index.short} eval doc(s) have < {index.n} words; they match nothing"
        )
    return index, {
        "eval_docs": len(index.ids),
        "eval_ngrams": len(index),
        "eval_bad": bad,
        "eval_short": index.short,
    }


def run(inputs: list[Path], out: Path, cfg: DedupConfig, force: bool = False) -> dict[str, Any]:
    """Deduplicate `inputs` into the docs artifact `out`; returns the manifest stats."""
    near = cfg.near
    try:
        bands, rows, threshold = dd.lsh_params(near.num_perm, near.bands, near.rows, near.threshold)
    except ValueError as e:
        raise UsageError(str(e)) from e
    files = resolve_inputs(inputs)
    index, decontam = _eval_index(cfg)
    names = {f"input-{i}": Path(p) for i, p in enumerate(inputs)}
    names |= {f"eval-{i}": Path(p) for i, p in enumerate(cfg.decontam.paths)}
    with (
        open_engine(cfg.engine, cfg.workers) as engine,
        building(
            out, kind="docs", command="dedup", config=to_dict(cfg), inputs=names, force=force
        ) as art,
    ):
        t0 = time.perf_counter()  # after the engine is up: Ray's start-up is not the stage's
        # Pass 1: compact per-doc arrays, computed in workers, gathered in input order.
        collected = dd.Collected(near.num_perm)
        errlog = ErrorLog(art.dir / "rejected" / "errors.jsonl", cfg.strict)
        with errlog as errors, progress("dedup: signatures", unit="docs") as bar:
            tasks = batched(iter_raw(files, cfg), BATCH_DOCS)
            for bad, ids, sizes, signed in engine.map(_sign, tasks, _init, (cfg, index)):
                for b in bad:
                    errors.add(b)
                collected.add(ids, sizes, signed)
                bar.advance(len(ids))
        signed, size = collected.finish()
        t_sign = time.perf_counter() - t0
        plan = dd.plan_dedup(
            signed, size[:, 0], use_exact=cfg.exact.enabled, use_near=near.enabled, bands=bands,
            rows=rows, threshold=threshold, verify=near.verify, keep=near.keep,
            pairs=ray_near_pairs(engine) if isinstance(engine, RayEngine) else None,
        )  # fmt: skip
        t_plan = time.perf_counter() - t0 - t_sign
        # Pass 2: stream the docs again and write each where the plan says.
        n, k, eval_ids = len(signed.exact), 0, index.ids if index else []
        writers = ShardWriter(art.dir), ShardWriter(art.dir / "rejected", "dropped")
        with writers[0] as kept, writers[1] as dropped, progress("dedup: write", n, "docs") as bar:
            tasks = batched(iter_raw(files, cfg), BATCH_DOCS)
            # Re-parsing JSON is cheaper here than shipping texts back from workers; only
            # HTML extraction is worth the worker pool a second time.
            html = any(f.name.lower().endswith((*WARC_SUFFIXES, ".html", ".htm")) for f in files)
            parse = engine.map if html else _in_process
            for docs in parse(_parse, tasks, _init, (cfg, None)):
                for doc in docs:
                    if isinstance(doc, Doc):
                        rec = doc.to_record() | plan.fields(k, collected.doc_id, eval_ids)
                        (kept if plan.status[k] == dd.KEPT else dropped).write(rec)
                        k += 1
                bar.advance(len(docs))
        if k != n:
            raise UsageError(f"the inputs changed while dedup read them ({n} docs, then {k})")
        elapsed = time.perf_counter() - t0
        counts = np.bincount(plan.status, minlength=4)
        art.stats.update(
            docs_in=n,
            docs_out=int(counts[dd.KEPT]),
            bytes_in=int(size[:, 1].sum()),
            bytes_out=int(size[plan.status == dd.KEPT, 1].sum()),
            exact_removed=int(counts[dd.EXACT]),
            near_removed=int(counts[dd.NEAR]),
            contaminated=int(counts[dd.CONTAMINATED]),
            **plan.stats,
            largest_clusters=plan.largest(collected.doc_id),
            lsh=dd.lsh_report(near.num_perm, bands, rows, threshold),
            decontam=decontam,
            bad_records=dict(sorted(errors.counts.items())),
            throughput={
                "workers": engine.workers, "seconds": round(elapsed, 3),
                "signature_s": round(t_sign, 3),
                "cluster_s": round(t_plan, 3), "docs_per_s": round(n / max(elapsed, 1e-9), 1),
                "mb_per_s": round(float(size[:, 1].sum()) / 1e6 / max(elapsed, 1e-9), 3),
            },
        )  # fmt: skip
    _report(art.stats, near.warn_cluster)
    info(f"wrote {out}")
    return art.stats


def _in_process(fn: Any, items: Any, init: Any, initargs: tuple[Any, ...]) -> Any:
    return ordered_map(fn, items, 1, init, initargs)


def _report(s: dict[str, Any], warn_share: float) -> None:
    n, big = s["docs_in"], s["largest_cluster"]
    if n and big > max(2, warn_share * n):
        warn(
            f"one cluster holds {big} of {n} docs ({big / n:.1%}; kept doc "
            f"{s['largest_clusters'][0]['kept']!r}): chained matches? see near.threshold"
        )
    lsh, tp = s["lsh"], s["throughput"]
    summary(
        "dedup",
        [
            ("docs in", n),
            ("docs out", s["docs_out"]),
            ("exact duplicates removed", s["exact_removed"]),
            ("near duplicates removed", s["near_removed"]),
            ("contaminated (eval overlap)", s["contaminated"]),
            ("clusters (> 1 doc) / largest", f"{s['clusters']:,} / {big:,}"),
            ("candidate pairs / verified", f"{s['candidate_pairs']:,} / {s['verified_pairs']:,}"),
            (f"LSH {lsh['bands']}×{lsh['rows']} of {lsh['num_perm']}: threshold", lsh["threshold"]),
            *(
                (f"  P(candidate) at similarity {k}", f"{v:.3f}")
                for k, v in lsh["p_candidate"].items()
            ),
            ("malformed records", sum(s["bad_records"].values())),
            ("throughput", f"{tp['docs_per_s']:,.0f} docs/s, {tp['mb_per_s']:.2f} MB/s"),
            ("workers", tp["workers"]),
        ],
    )
