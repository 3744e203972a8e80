"""`llmctl eval`: loss, perplexity and bits per byte of a checkpoint on held-out text.

DATA is a `tokens` artifact (its val split is scored; it must have been made with the
checkpoint's tokenizer) or documents: a `docs` artifact or raw text files, encoded with the
checkpoint's tokenizer, each document followed by <|eos|> as `tokenize` does.

The token stream is cut into windows of `seq_len + 1` tokens that overlap by one, so every
token but the first is predicted exactly once, from up to `seq_len` tokens of context.
loss = mean negative log-likelihood (nats) per predicted token; perplexity = exp(loss);
bits per byte = nats of the predicted non-special tokens / ln 2 / the UTF-8 bytes they decode
to. Bits per byte does not depend on the tokenizer, so models with different vocabularies
compare on it.

Example:
    llmctl eval out/ckpt out/tokens
    llmctl eval out/ckpt held_out.txt --json
    llmctl eval out/ckpt out/tokens --out out/eval-ckpt   # an `eval` artifact (eval.json)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from llmctl.artifacts import building, open_artifact
from llmctl.config import helpful, to_dict
from llmctl.data.docs import ReadOptions
from llmctl.data.heldout import token_ids
from llmctl.errors import UsageError
from llmctl.runtime import human_bytes, summary
from llmctl.scoring import score, text_bytes


@dataclass(frozen=True)
class EvalConfig(ReadOptions):
    """Settings of `llmctl eval`."""

    seq_len: int = helpful(0, "context per window (0 = the model's max_seq_len)")
    batch_size: int = helpful(8, "windows per forward pass")
    max_tokens: int = helpful(0, "score at most this many tokens (0 = all)")
    device: Literal["auto", "cpu", "cuda"] = helpful("auto", "auto: CUDA when available")
    dtype: Literal["auto", "float32", "bfloat16"] = helpful(
        "auto", "auto: bf16 autocast on CUDA, fp32 on CPU"
    )


def run(
    checkpoint: Path,
    data: list[Path],
    cfg: EvalConfig,
    as_json: bool = False,
    out: Path | None = None,
    force: bool = False,
) -> dict:
    """Score `checkpoint` on `data`; print a table (and JSON on stdout with `as_json`); with
    `out`, also publish the figures as an `eval` artifact (`eval.json`, the same in `stats`)."""
    from llmctl.model.io import load_model
    from llmctl.tokenizer import check_fits, load_specials, load_tokenizer
    from llmctl.train.distributed import pick_device

    started = time.time()
    open_artifact(checkpoint, "checkpoint")
    tok = load_tokenizer(checkpoint)
    specials = load_specials(checkpoint)
    model = load_model(checkpoint, device=pick_device(cfg.device))
    check_fits(tok, model.config.vocab_size, str(checkpoint))
    if getattr(model.config, "head", "lm") == "score":
        return reward_eval(checkpoint, model, data, cfg, as_json)
    if not model.config.causal:
        raise UsageError(f"{checkpoint}: a bidirectional (masked-LM) model has no next-token loss")
    seq_len = cfg.seq_len or model.config.max_seq_len
    if not 1 <= seq_len <= model.config.max_seq_len or cfg.batch_size < 1:
        raise UsageError(f"config key 'seq_len': must be in 1..{model.config.max_seq_len}")
    ids, source = token_ids(data, checkpoint, tok, cfg)
    if cfg.max_tokens:
        ids = ids[: cfg.max_tokens]
    if len(ids) < 2:
        raise UsageError(f"{source}: fewer than 2 tokens to score")
    if int(ids.max()) >= model.config.vocab_size:  # a shard with ids its header does not allow
        raise UsageError(f"{source}: token id {int(ids.max())} is beyond the model's vocabulary")
    special = np.array(sorted(specials.all), dtype=np.int64)
    nats, n, text_nats, n_text = score(model, ids, special, seq_len, cfg.batch_size, cfg.dtype)
    n_bytes = text_bytes(tok, ids[1:], special)
    loss = nats / n
    result = {
        "checkpoint": str(checkpoint),
        "data": source,
        "tokens": n,
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": text_nats / math.log(2) / n_bytes if n_bytes else None,
        "bytes": n_bytes,
        "text_tokens": n_text,
        "seq_len": seq_len,
    }
    bpb = result["bits_per_byte"]
    summary(
        f"eval {checkpoint}",
        [
            ("data", source),
            ("tokens scored", n),
            ("loss (nats/token)", f"{loss:.4f}"),
            ("perplexity", f"{result['perplexity']:.3f}"),
            ("bits per byte", "-" if bpb is None else f"{bpb:.4f}"),
            ("text", f"{human_bytes(n_bytes)} in {n_text:,} tokens"),
        ],
    )
    if as_json:
        print(json.dumps(result, indent=2))
    if out is not None:
        inputs = {"checkpoint": checkpoint, **{f"eval-{i}": p for i, p in enumerate(data)}}
        with building(out, kind="eval", command="eval", config=to_dict(cfg), inputs=inputs,
                      force=force, started=started) as art:  # fmt: skip
            (art.dir / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
            art.stats.update(result)
    return result


def reward_eval(
    checkpoint: Path, model: torch.nn.Module, data: list[Path], cfg: EvalConfig, as_json: bool
) -> dict:
    """A reward model (head = score) on preference pairs: its pairwise accuracy (the share of
    pairs whose chosen answer scores higher), mean margin and scores; every pair is scored."""
    from llmctl.data.preferences import PairRows, PreferenceDataConfig, load_preferences
    from llmctl.tokenizer import CHAT_TEMPLATE, chat_template_of, load_specials, load_tokenizer
    from llmctl.train.preference import pairwise_accuracy

    tok, specials = load_tokenizer(checkpoint), load_specials(checkpoint)
    seq_len = cfg.seq_len or model.config.max_seq_len
    if not 1 <= seq_len <= model.config.max_seq_len:
        raise UsageError(f"config key 'seq_len': must be in 1..{model.config.max_seq_len}")
    opts = PreferenceDataConfig(val_fraction=0.0, strict=cfg.strict)
    loaded = load_preferences(data, tok, template=chat_template_of(checkpoint) or CHAT_TEMPLATE,
                              end_id=specials.end_of_turn, ctx=seq_len, opts=opts)  # fmt: skip
    items = loaded.items
    rows = PairRows(items, list(range(len(items))), batch_size=cfg.batch_size, seed=0,
                    pad_id=specials.pad_or_eos, shuffle=False)  # fmt: skip
    device = next(model.parameters()).device
    figures = pairwise_accuracy(model, rows.sequential(), device=device)
    s = loaded.stats
    result = {"checkpoint": str(checkpoint), "data": ", ".join(map(str, data)), **figures,
              "cut": s["cut"], "rejected": s["rejected_total"], "seq_len": seq_len}  # fmt: skip
    summary(
        f"eval {checkpoint} (reward model)",
        [
            ("data", result["data"]),
            ("pairs scored", f"{figures['pairs']:,} ({s['cut']:,} cut to {seq_len} tokens; "
                             f"{s['rejected_total']:,} rejected)"),
            ("pairwise accuracy", f"{figures['accuracy']:.4f}"),
            ("margin", f"{figures['margin']:.4f}"),
            ("scores", f"chosen {figures['chosen_score']:.4f}, "
                       f"rejected {figures['rejected_score']:.4f}"),
        ],
    )  # fmt: skip
    if as_json:
        print(json.dumps(result, indent=2))
    return result
