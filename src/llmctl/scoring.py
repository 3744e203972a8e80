"""What a model scores on token ids: next-token loss and bits per byte (`llmctl eval`,
quantize's before/after report, the build report) and greedy batch-1 decode speed.

Bits per byte counts the nats of the non-special targets over the UTF-8 bytes they decode to,
so models with different tokenizers compare on it.

Example:
    nats, n, text_nats, n_text = score(model, ids, special, seq_len=256, batch_size=8)
    loss_and_bits_per_byte(model, ids, tok, 256, special)  # {"val_loss", "bits_per_byte"}
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmctl.runtime import progress


@torch.no_grad()
def score(
    model: torch.nn.Module,
    ids: np.ndarray,
    special: np.ndarray,
    seq_len: int,
    batch_size: int,
    precision: str = "auto",
) -> tuple[float, int, float, int]:
    """(nats, tokens, nats of non-special targets, non-special targets) of next-token
    prediction over `ids`, in windows of seq_len + 1 tokens overlapping by one."""
    from llmctl.train.loop import autocast

    device = next(model.parameters()).device
    starts = list(range(0, len(ids) - 1, seq_len))
    nats = torch.zeros(2, dtype=torch.float64, device=device)
    counts = [0, 0]
    with progress("eval", total=len(starts), unit="it") as bar:
        for i in range(0, len(starts), batch_size):
            group = starts[i : i + batch_size]
            # the last window may be shorter: score it on its own
            for rows in _same_length(ids, group, seq_len):
                x = torch.from_numpy(np.stack(rows).astype(np.int64)).to(device)
                with autocast(device, precision):
                    logits = model(x[:, :-1])
                nll = F.cross_entropy(
                    logits.float().transpose(1, 2), x[:, 1:], reduction="none"
                ).double()
                text = torch.from_numpy(~np.isin(np.stack(rows)[:, 1:], special)).to(device)
                nats[0] += nll.sum()
                nats[1] += (nll * text).sum()
                counts[0] += nll.numel()
                counts[1] += int(text.sum())
            bar.advance(len(group))
    total, text_nats = nats.tolist()
    return total, counts[0], text_nats, counts[1]


def _same_length(ids: np.ndarray, starts: list[int], seq_len: int) -> list[list[np.ndarray]]:
    rows = [ids[s : s + seq_len + 1] for s in starts]
    full = [r for r in rows if len(r) == seq_len + 1]
    return [g for g in (full, [r for r in rows if len(r) != seq_len + 1]) if g]


def text_bytes(tok: Any, ids: np.ndarray, special: np.ndarray) -> int:
    """UTF-8 bytes that the non-special tokens of `ids` decode to (decoded between specials,
    so multi-byte characters split across tokens count once)."""
    cuts = np.flatnonzero(np.isin(ids, special))
    pieces = [p for p in np.split(ids, cuts) if len(p)]
    pieces = [p[1:] if np.isin(p[0], special) else p for p in pieces]
    texts = tok.decode_batch([p.tolist() for p in pieces if len(p)])
    return sum(len(t.encode("utf-8")) for t in texts)


def loss_and_bits_per_byte(
    model: Any, ids: np.ndarray, tok: Any, seq_len: int, special: np.ndarray
) -> dict[str, float | None]:
    """Loss (nats/token) and bits per byte of `model` on `ids`, as `llmctl eval` scores them
    (`special`: the special token ids, left out of bits per byte)."""
    nats, n, text_nats, _ = score(model, ids, special, seq_len, 8, "float32")
    n_bytes = text_bytes(tok, ids[1:], special)
    return {
        "val_loss": nats / n,
        "bits_per_byte": text_nats / math.log(2) / n_bytes if n_bytes else None,
    }


@torch.no_grad()
def decode_speed(model: Any, n_tokens: int, dtype: torch.dtype | None) -> float:
    """Greedy batch-1 decoding tokens/s on the CPU with a KV cache (a copy of `model` is cast
    to `dtype`, as `generate` does). One warm-up pass first (kernel packing, allocator)."""
    m = copy.deepcopy(model).cpu()
    if dtype is not None:
        m.to(dtype)
    m.use_decode_layout(1)
    length = min(n_tokens + 1, m.config.max_seq_len)
    best = 0.0
    for timed in (False, True):
        cache = m.make_cache(1, length)
        x = torch.zeros(1, 1, dtype=torch.long)
        t0 = time.perf_counter()
        for _ in range(length):
            x = m(x, cache=cache, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
        if timed:
            best = length / (time.perf_counter() - t0)
    return best
