"""From documents to tokens: the tokenizer's training sample, the train/val rule, and the
parallel encoder that writes token shards.

- `SplitRule`: a document is in val when the xxh64 hash of its text (salted by `seed`) falls
  below `val_fraction`. Hashing the text, not the id or path, keeps exact duplicates on one side
  of the split and makes the split independent of where the files live. When no document lands
  in val (a single-document input, or very few documents), val takes the last `val_fraction` of
  the tokens from the end of the last document instead.
- `TrainingSample` / `training_sample`: pass 1, the text the tokenizer trains on.
- `encode_corpus`: pass 2, documents encoded in worker processes (one core each, one tokenizer
  each), written in input order, each followed by <|eos|>: byte-identical for any worker count.

Example:
    rule = SplitRule(val_fraction=0.01, seed=0)
    sample, n = training_sample(files, opts, rule, train_bytes=200_000_000, doc_chars=10_000)
    tok = train_tokenizer(sample.texts(), 8192)
    stats = encode_corpus(files, opts, rule, tok, out_dir, shard_tokens=10**8,
                          eos_id=1, engine=LocalEngine(workers=2), errors=errors)
"""

from __future__ import annotations

import hashlib
import heapq
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from tokenizers import Tokenizer

from llmctl.data.docs import BadRecord, ErrorLog, Raw, ReadOptions, iter_raw, parse_raw
from llmctl.data.engine import LocalEngine, RayEngine
from llmctl.data.tokens import ShardWriter, token_dtype
from llmctl.errors import UsageError
from llmctl.runtime import progress
from llmctl.tokenizer import clean_text

# A worker task holds up to this much raw input: large enough to amortize IPC, small enough that
# the last tasks finish together (workers stay busy) and memory stays bounded.
BATCH_BYTES = 1 << 20
BATCH_DOCS = 1024


@dataclass(frozen=True)
class SplitRule:
    """Which split a document belongs to, from a salted hash of its text."""

    val_fraction: float = 0.01
    seed: int = 0

    def split_of(self, text: str) -> str:
        h = xxhash.xxh64_intdigest(text.encode("utf-8", "surrogatepass"), seed=self.seed)
        return "val" if h < self.val_fraction * 2.0**64 else "train"


class TrainingSample:
    """The texts a tokenizer trains on: documents in order of a content hash, up to a byte budget.

    The kept set is the shortest prefix, in hash order, of all offered documents (each cut to
    `doc_chars` characters; 0 = no cut) that reaches `budget` UTF-8 bytes, its last member
    trimmed to fit. So it does not depend on input order, and memory stays near `budget`.

    Example:
        sample = TrainingSample(budget=200_000_000, doc_chars=10_000)
        for text in texts:
            sample.offer(text)
        tok = train_tokenizer(sample.texts(), 8192)
    """

    def __init__(self, budget: int, doc_chars: int = 0, salt: int = 0) -> None:
        if budget < 1:
            raise UsageError(f"train_bytes must be positive (got {budget})")
        self.budget, self.doc_chars, self.salt = budget, doc_chars, salt
        self._heap: list[tuple[int, int, str, int]] = []  # (-hash, -tiebreak, text, bytes)
        self._bytes = 0
        self._evicted = (1 << 64, 0)  # smallest (hash, tiebreak) ever evicted
        self.offered_bytes = 0

    def offer(self, text: str) -> None:
        """Consider one document for the sample."""
        text = clean_text(text)
        self.offered_bytes += len(text.encode("utf-8"))
        if self.doc_chars:
            text = text[: self.doc_chars]
        data = text.encode("utf-8")
        key = (xxhash.xxh64_intdigest(data, seed=self.salt), xxhash.xxh3_64_intdigest(data))
        if not data or key >= self._evicted:
            return  # a document with a smaller hash already fell out: this one cannot be in
        heapq.heappush(self._heap, (-key[0], -key[1], text, len(data)))
        self._bytes += len(data)
        # Drop the largest-hash documents while the others still reach the budget.
        while self._heap and self._bytes - self._heap[0][3] >= self.budget:
            h, t, _, n = heapq.heappop(self._heap)
            self._bytes -= n
            self._evicted = min(self._evicted, (-h, -t))

    def texts(self) -> list[str]:
        """The sample in hash order; the last text is cut so the total is at most the budget."""
        items = sorted(self._heap, key=lambda x: (-x[0], -x[1]))
        out = [t for _, _, t, _ in items]
        excess = self._bytes - self.budget
        if out and excess > 0:
            last = out[-1].encode("utf-8")
            out[-1] = last[: len(last) - excess].decode("utf-8", "ignore")
        return [t for t in out if t]

    def digest(self) -> str:
        """sha256 of the exact training text (to check that a tokenizer can be reproduced)."""
        h = hashlib.sha256()
        for t in self.texts():
            h.update(t.encode("utf-8") + b"\0")
        return h.hexdigest()


def training_sample(
    files: list[Path],
    opts: ReadOptions,
    rule: SplitRule,
    train_bytes: int,
    doc_chars: int,
    errors: ErrorLog | None = None,
) -> tuple[TrainingSample, int]:
    """Pass 1: the sample of train-split text that trains the tokenizer, and the document count.

    Malformed records are skipped here (pass 2 logs them), except that `opts.strict` fails at the
    first. A single-document input trains on its train part (its head) with no `doc_chars` cut.
    """
    sample = TrainingSample(train_bytes, doc_chars, salt=rule.seed + 1)
    n, lone = 0, ""
    with progress("sample", unit="docs") as bar:
        for raw in iter_raw(files, opts):
            doc = parse_raw(raw, opts) if isinstance(raw, Raw) else raw
            if isinstance(doc, BadRecord):
                if opts.strict and errors is not None:
                    errors.add(doc)  # raises
                continue
            if not doc.text:
                continue
            n += 1
            lone = doc.text if n == 1 else ""
            if rule.split_of(doc.text) == "train":
                sample.offer(doc.text)
            bar.advance(1)
    if n == 1:
        sample = TrainingSample(train_bytes, 0, salt=rule.seed + 1)
        sample.offer(lone[: int(len(lone) * (1 - rule.val_fraction))])
    return sample, n


@dataclass
class Encoded:
    """One batch of documents, encoded: a token array per split (each doc + eos) and counts."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    docs: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0})
    bytes: int = 0
    last_len: int = 0  # tokens (eos included) of the batch's last train document
    bad: list[BadRecord] = field(default_factory=list)
    empty: int = 0


_W: dict[str, Any] = {}  # per-worker state set by _init


def _init(tok_json: str, opts: ReadOptions, rule: SplitRule, eos_id: int) -> None:
    # One core per worker: --workers processes, not workers × tokenizers threads.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = Tokenizer.from_str(tok_json)
    tok.encode_special_tokens = True  # "<|eos|>" typed in a document is text, not a token
    _W.update(tok=tok, opts=opts, rule=rule, eos=eos_id, dtype=token_dtype(tok.get_vocab_size()))


def _encode(items: list[Raw | BadRecord]) -> Encoded:
    opts, rule = _W["opts"], _W["rule"]
    out = Encoded()
    texts, splits = [], []
    for item in items:
        doc = parse_raw(item, opts) if isinstance(item, Raw) else item
        if isinstance(doc, BadRecord):
            out.bad.append(doc)
        elif not doc.text:
            out.empty += 1
        else:
            split = rule.split_of(doc.text)
            text = clean_text(doc.text)
            texts.append(text)
            splits.append(split)
            out.docs[split] += 1
            out.bytes += len(text.encode("utf-8"))
    flat: dict[str, list[int]] = {"train": [], "val": []}
    for split, enc in zip(
        splits, _W["tok"].encode_batch_fast(texts, add_special_tokens=False), strict=True
    ):
        ids = enc.ids
        flat[split].extend(ids)
        flat[split].append(_W["eos"])
        if split == "train":
            out.last_len = len(ids) + 1
    out.arrays = {s: np.array(v, dtype=_W["dtype"]) for s, v in flat.items()}
    return out


def _tail_split(e: Encoded, fraction: float, single: bool, train_tokens: int, eos_id: int) -> int:
    """Move the tail of the last train document into val: `fraction` of the lone document, or of
    all train tokens when no document hashed into val. Returns the number of tokens moved."""
    if single and e.docs["val"]:  # the lone document hashed into val: start it in train
        e.arrays = {"train": e.arrays["val"], "val": e.arrays["val"][:0]}
        e.last_len = len(e.arrays["train"])
    doc_tokens = e.last_len - 1
    base = doc_tokens if single else train_tokens
    moved = min(max(1, math.ceil(base * fraction)), doc_tokens - 1)
    if moved < 1 or fraction == 0:
        return 0
    arr, val = e.arrays["train"], e.arrays["val"]
    cut = len(arr) - 1 - moved  # the doc's final eos goes to val with its tail
    eos = np.array([eos_id], dtype=arr.dtype)
    e.arrays = {"train": np.concatenate([arr[:cut], eos]), "val": np.concatenate([val, arr[cut:]])}
    return moved


def _batches(items: Iterator[Raw | BadRecord]) -> Iterator[list[Raw | BadRecord]]:
    """Consecutive lists of at most BATCH_DOCS records and about BATCH_BYTES of input."""
    batch: list[Raw | BadRecord] = []
    size = 0
    for item in items:
        batch.append(item)
        payload = getattr(item, "payload", b"")
        size += len(payload) if isinstance(payload, bytes | str) else 1024
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def encode_corpus(
    files: list[Path],
    opts: ReadOptions,
    rule: SplitRule,
    tok: Tokenizer,
    out_dir: Path,
    *,
    eos_id: int,
    shard_tokens: int,
    engine: LocalEngine | RayEngine,
    errors: ErrorLog,
    tokenizer_digest: bytes = b"",
    expected_docs: int | None = None,
) -> dict[str, Any]:
    """Pass 2: encode every document, each followed by `eos_id`, into
    `out_dir/{train,val}-NNNNN.bin`; returns the stats.

    The blocks are encoded on `engine` (local pool or Ray) and written here, in input order.
    """
    vocab = tok.get_vocab_size()
    writers = {
        s: ShardWriter(
            out_dir,
            s,
            shard_tokens,
            vocab_size=vocab,
            eos_id=eos_id,
            tokenizer_digest=tokenizer_digest,
        )
        for s in ("train", "val")
    }
    counts = np.zeros(vocab, dtype=np.int64)
    docs, nbytes, empty = {"train": 0, "val": 0}, 0, 0
    pending: Encoded | None = None  # the last batch is held back for the val tail rule

    def flush(e: Encoded) -> None:
        for split, arr in e.arrays.items():
            writers[split].write(arr)
            counts[:] += np.bincount(arr, minlength=vocab)

    batches = _batches(iter_raw(files, opts))
    with _env("TOKENIZERS_PARALLELISM", "false"), progress("encode", expected_docs, "docs") as bar:
        for e in engine.map(_encode, batches, _init, (tok.to_str(), opts, rule, eos_id)):
            for bad in e.bad:
                errors.add(bad)
            empty += e.empty
            nbytes += e.bytes
            if e.docs["train"] + e.docs["val"]:
                for s in docs:
                    docs[s] += e.docs[s]
                if pending is not None:
                    flush(pending)
                pending = e
            bar.advance(e.docs["train"] + e.docs["val"])
    if pending is None:
        raise UsageError("no documents to tokenize: every input record is empty or malformed")
    single, tail = docs["train"] + docs["val"] == 1, 0
    if single or (docs["val"] == 0 and rule.val_fraction > 0):
        train_text_tokens = writers["train"].tokens + len(pending.arrays["train"]) - docs["train"]
        tail = _tail_split(pending, rule.val_fraction, single, train_text_tokens, eos_id)
    elif docs["train"] == 0:
        raise UsageError(f"all {docs['val']} documents hashed into val: lower val_fraction")
    flush(pending)
    names = {s: w.close() for s, w in writers.items()}
    tokens = {s: w.tokens for s, w in writers.items()}
    text_tokens = sum(tokens.values()) - sum(w.docs for w in writers.values())
    return {
        "tokens": tokens,
        "docs": {s: w.docs for s, w in writers.items()},
        "val_split": f"last {tail:,} tokens of the last document" if tail else "by text hash",
        "text_bytes": nbytes,
        "bytes_per_token": round(nbytes / max(text_tokens, 1), 4),
        "vocab_size": vocab,
        "vocab_used": int(np.count_nonzero(counts)),
        "dtype": writers["train"].dtype.name,
        "eos_id": eos_id,
        "shards": names,
        "empty_docs": empty,
        "bad_records": dict(sorted(errors.counts.items())),
    }
