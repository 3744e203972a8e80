"""The token ids a checkpoint is scored or calibrated on (eval, quantize, the report).

A `tokens` artifact's split, checked to come from the checkpoint's tokenizer, or documents
(a `docs` artifact or raw files) encoded with it, each followed by <|eos|> as `tokenize`
does; and the tokens artifact a checkpoint was trained on, found through its lineage.

Example:
    ids, source = token_ids([Path("out/tokens")], ckpt, tok, opts)    # the val split
    ids, source = token_ids([Path("held_out.txt")], ckpt, tok, opts, limit=4096)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl.artifacts import is_artifact, open_artifact
from llmctl.data.docs import BadRecord, ReadOptions, iter_docs
from llmctl.errors import UsageError
from llmctl.runtime import warn


def split_ids(tokens: Path, checkpoint: Path, split: str, limit: int = 0) -> np.ndarray:
    """The ids of a tokens artifact's `split` (at most `limit`; 0 = all), int64. Refuses an
    artifact made with another tokenizer than `checkpoint`'s, and ids past its vocabulary."""
    from llmctl.data.tokens import check_ids, read_header, read_shard, split_shards

    m = open_artifact(tokens, "tokens")
    ours = open_artifact(checkpoint, "checkpoint", verify=False).files["tokenizer.json"]
    if m.files["tokenizer.json"]["sha256"] != ours["sha256"]:
        raise UsageError(f"{tokens}: made with a different tokenizer than {checkpoint}")
    parts, n = [], 0
    for p in split_shards(m.path, split):
        parts.append(np.asarray(read_shard(p)))
        check_ids(p, parts[-1], read_header(p).vocab_size)  # an id past the vocab fails here
        n += len(parts[-1])
        if limit and n >= limit:
            break
    ids = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
    return ids[:limit] if limit else ids


def is_tokens(path: Path) -> bool:
    """Whether `path` is a tokens artifact."""
    return is_artifact(path) and open_artifact(path, ("tokens", "docs"), verify=False).kind == (
        "tokens"
    )


def token_ids(
    data: Sequence[Path],
    checkpoint: Path,
    tok: Any,
    opts: ReadOptions,
    split: str = "val",
    limit: int = 0,
) -> tuple[np.ndarray, str]:
    """(ids, description) of DATA: one tokens artifact's `split`, or documents encoded with
    the checkpoint's tokenizer, each followed by its eos. Malformed records are skipped and
    counted (or fail with `opts.strict`)."""
    from llmctl.tokenizer import encode, load_specials

    if len(data) == 1 and is_tokens(data[0]):
        return split_ids(data[0], checkpoint, split, limit), f"{data[0]} ({split} split)"
    eos = load_specials(checkpoint).eos
    source = ", ".join(map(str, data))
    ids: list[int] = []
    bad = 0
    for doc in iter_docs(list(data), opts):
        if isinstance(doc, BadRecord):
            if opts.strict:
                raise UsageError(f"{doc.where}: {doc.reason}")
            bad += 1
            continue
        ids.extend([*encode(tok, doc.text), eos])
        if limit and len(ids) >= limit:
            break
    if bad:
        warn(f"{source}: skipped {bad:,} malformed record(s)")
    arr = np.array(ids, dtype=np.int64)
    return (arr[:limit] if limit else arr), source


def lineage_tokens(checkpoint: Path, depth: int = 8) -> Path | None:
    """The tokens artifact a checkpoint was trained on: its manifest's `tokens` input, or
    that of the checkpoint it was made from (finetune, quantize, ...), if still on disk."""
    path: Path | None = checkpoint
    for _ in range(depth):
        if path is None or not is_artifact(path):
            return None
        inputs = open_artifact(path, ("checkpoint", "tokens"), verify=False).data.get("inputs", {})
        tokens = inputs.get("tokens", {})
        if tokens.get("kind") == "tokens" and is_artifact(Path(tokens["path"])):
            return Path(tokens["path"])
        parent = inputs.get("checkpoint", {})
        path = Path(parent["path"]) if parent.get("kind") == "checkpoint" else None
    return None


def windows(ids: np.ndarray, seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Non-overlapping [≤batch_size, seq_len] windows of `ids` (the tail dropped)."""
    n = len(ids) // seq_len
    rows = torch.from_numpy(ids[: n * seq_len].reshape(n, seq_len))
    return [rows[i : i + batch_size] for i in range(0, n, batch_size)]
