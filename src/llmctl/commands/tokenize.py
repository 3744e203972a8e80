"""`llmctl tokenize`: train a byte-level BPE tokenizer and encode documents into token shards.

Reads `docs` artifacts or raw inputs; writes a `tokens` artifact: `tokenizer.json`,
`tokenizer_config.json`, `train-NNNNN.bin`, `val-NNNNN.bin` (format in `llmctl.data.tokens`)
and `rejected/errors.jsonl` (malformed input records).

Pass 1 (skipped with `--tokenizer`) picks the training text by a hash of each document's text,
under `train_bytes`, and trains. Pass 2 encodes in worker processes, each document followed by
<|eos|>. The split and sampling rules are in `llmctl.data.corpus`.

Example:
    llmctl tokenize out/dedup --out out/tokens --vocab-size 8192
"""

from __future__ import annotations

import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.artifacts import Manifest, building, open_artifact, sha256_file
from llmctl.config import helpful, nested, to_dict
from llmctl.data.corpus import SplitRule, encode_corpus, training_sample
from llmctl.data.docs import ErrorLog, ReadOptions, resolve_inputs
from llmctl.data.engine import EngineConfig, open_engine
from llmctl.errors import UsageError
from llmctl.runtime import human_bytes, info, summary, warn
from llmctl.tokenizer import (
    load_specials,
    load_tokenizer,
    save_tokenizer,
    tokenizer_file,
    train_tokenizer,
)


@dataclass(frozen=True)
class TokenizeConfig(ReadOptions):
    """Settings of `llmctl tokenize`."""

    vocab_size: int = helpful(8192, "vocabulary size to train (the 8 special tokens included)")
    tokenizer: str = helpful(
        "", "reuse this tokenizer.json, tokens artifact or checkpoint instead of training"
    )
    train_bytes: int = helpful(
        200_000_000, "at most this much text trains the tokenizer (documents picked by text hash)"
    )
    doc_chars: int = helpful(
        10_000, "each document gives at most this many characters to training (0 = all)"
    )
    min_frequency: int = helpful(2, "a pair must occur this often to become a merge")
    val_fraction: float = helpful(0.01, "share of documents (by text hash) held out for val")
    shard_tokens: int = helpful(100_000_000, "at most this many tokens per shard file")
    model_max_length: int = helpful(2048, "model_max_length written to tokenizer_config.json")
    seed: int = helpful(0, "salt of the text hashes that pick val documents and training text")
    workers: int = helpful(0, "encoding worker processes, one core each (0 = all cores)")
    engine: EngineConfig = nested(
        EngineConfig, "where encoding runs: local pool or Ray (training stays on the driver)"
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1 or self.train_bytes < 1 or self.doc_chars < 0:
            raise ValueError("shard_tokens and train_bytes must be positive, doc_chars >= 0")


def _train(files: list[Path], cfg: TokenizeConfig, rule: SplitRule, errors: ErrorLog) -> Any:
    """Pass 1 and training; returns the tokenizer, its stats and the document count."""
    t0 = time.monotonic()
    sample, n_docs = training_sample(files, cfg, rule, cfg.train_bytes, cfg.doc_chars, errors)
    texts = sample.texts()
    if n_docs and not texts:
        raise UsageError(f"all {n_docs} documents hashed into val: lower val_fraction")
    size = sum(len(t.encode("utf-8")) for t in texts)
    if texts:
        info(f"training a {cfg.vocab_size:,}-token BPE on {human_bytes(size)} of text ...")
    tok = train_tokenizer(texts, cfg.vocab_size, min_frequency=cfg.min_frequency)
    share = size / max(sample.offered_bytes, 1)
    if share < 0.5 and size < cfg.train_bytes // 2 and cfg.doc_chars:
        warn(f"the tokenizer saw {share:.0%} of the text (doc_chars); try --set doc_chars=0")
    stats = {
        "trained": True,
        "sample_docs": len(texts),
        "sample_bytes": size,
        "share_of_train_text": round(share, 4),
        "sample_sha256": sample.digest(),
        "train_s": round(time.monotonic() - t0, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return tok, stats, n_docs


def run(inputs: list[Path], out: Path, cfg: TokenizeConfig, force: bool = False) -> Manifest:
    """Train (or load) the tokenizer, encode `inputs` and publish the `tokens` artifact at `out`."""
    files = resolve_inputs(inputs)
    rule = SplitRule(cfg.val_fraction, cfg.seed)
    refs: dict[str, Path] = {f"input-{i}": Path(p) for i, p in enumerate(inputs)}
    if cfg.tokenizer:
        refs["tokenizer"] = tokenizer_file(cfg.tokenizer)
        load_specials(refs["tokenizer"])  # its files parse: errors name them, not our copies
    meta = {"kind": "tokens", "command": "tokenize", "config": to_dict(cfg), "inputs": refs}
    with (
        open_engine(cfg.engine, cfg.workers) as engine,
        building(out, force=force, **meta) as art,
        ErrorLog(art.dir / "rejected" / "errors.jsonl", cfg.strict) as errors,
    ):
        if cfg.tokenizer:
            # The source's files are copied byte for byte, so that a checkpoint made with this
            # tokenizer and these tokens can tell they match (pretrain --init compares sha256).
            src = tokenizer_file(cfg.tokenizer)
            tok, n_docs = load_tokenizer(src), None
            tstats: dict[str, Any] = {"trained": False, "source": str(cfg.tokenizer)}
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (src.parent / name).is_file():
                    shutil.copyfile(src.parent / name, art.dir / name)
            if not (art.dir / "tokenizer_config.json").is_file():
                save_tokenizer(tok, art.dir, cfg.model_max_length)  # a bare llmctl tokenizer.json
        else:
            tok, tstats, n_docs = _train(files, cfg, rule, errors)
            save_tokenizer(tok, art.dir, cfg.model_max_length)
        specials = load_specials(art.dir)
        digest = bytes.fromhex(sha256_file(art.dir / "tokenizer.json"))[:8]
        t1 = time.monotonic()
        stats = encode_corpus(
            files,
            cfg,
            rule,
            tok,
            art.dir,
            shard_tokens=cfg.shard_tokens,
            engine=engine,
            errors=errors,
            eos_id=specials.eos,
            tokenizer_digest=digest,
            expected_docs=n_docs or None,
        )
        encode_s = time.monotonic() - t1
        stats.update(
            tokenizer=tstats,
            workers=engine.workers,
            encode_s=round(encode_s, 2),
            encode_mb_s=round(stats["text_bytes"] / 1e6 / max(encode_s, 1e-9), 2),
        )
        art.stats.update(stats)
    _summary(out, stats)
    return open_artifact(out, "tokens", verify=False)


def _summary(out: Path, s: dict[str, Any]) -> None:
    t = s["tokenizer"]
    if t["trained"]:
        trained = (
            f"trained on {human_bytes(t['sample_bytes'])} ({t['share_of_train_text']:.1%} of "
            f"train text) in {t['train_s']:.1f} s, peak RSS {t['peak_rss_mb']:,.0f} MB"
        )
    else:
        trained = f"reused {t['source']}"
    bad = sum(s["bad_records"].values())
    summary(
        f"tokenize → {out}",
        [
            ("documents (train / val)", f"{s['docs']['train']:,} / {s['docs']['val']:,}"),
            ("tokens (train / val)", f"{s['tokens']['train']:,} / {s['tokens']['val']:,}"),
            ("val split", s["val_split"]),
            ("malformed / empty skipped", f"{bad:,} / {s['empty_docs']:,}"),
            ("text", human_bytes(s["text_bytes"])),
            ("bytes per token", f"{s['bytes_per_token']:.3f}"),
            ("vocabulary (used / size)", f"{s['vocab_used']:,} / {s['vocab_size']:,}"),
            ("tokenizer", trained),
            ("encode", f"{s['encode_mb_s']:.2f} MB/s, {s['workers']} worker(s)"),
            ("shards (train / val)", f"{len(s['shards']['train'])} / {len(s['shards']['val'])}"),
        ],
    )
