"""Token shards: self-describing binary files, and the (B, T+1) batches training reads from them.

A shard (`train-00000.bin`, `val-00000.bin`, ...) is a 64-byte little-endian header followed by
the tokens, `uint16` when the vocabulary has at most 65,536 ids, else `uint32`:

    offset  size  field
    0       8     magic b"LLMTOK\\0\\0"
    8       4     format version (1)
    12      4     bytes per token (2 or 4)
    16      8     token count
    24      4     vocabulary size
    28      4     eos id (every document is followed by it)
    32      8     documents that end in this shard
    40      8     first 8 bytes of the sha256 of the tokenizer.json that made the tokens
    48      16    reserved (zero)

`read_shard` checks the magic, version, dtype and that the file length is exactly header +
count × itemsize, so a truncated or foreign file is refused with a message naming it.

A split is the concatenation of its shards in name order. `TokenStream` memory-maps them and
serves next-token training windows: epoch by epoch, the split is cut into non-overlapping
windows of T+1 tokens (starting at a per-epoch random shift), shuffled, and dealt out B at a
time (to each rank in turn under data parallelism). A batch depends only on (seed, step, rank),
so resuming at step s needs no other state, and every token is seen once per epoch.

Example:
    stream = TokenStream("out/tokens", "train", batch_size=8, seq_len=256, seed=0)
    for step in range(start_step, max_steps):
        xy = torch.from_numpy(stream.sample(step))        # int64 [8, 257]
        x, y = xy[:, :-1], xy[:, 1:]
    val = TokenStream("out/tokens", "val", batch_size=8, seq_len=256)
    for xy in val.sequential():                           # each val token once, in order
        ...
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmctl.errors import UsageError

MAGIC = b"LLMTOK\0\0"
VERSION = 1
HEADER = struct.Struct("<8sIIQIIQ8s16x")
HEADER_BYTES = HEADER.size  # 64
assert HEADER_BYTES == 64
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


@dataclass(frozen=True)
class ShardHeader:
    """The fixed header of one shard."""

    itemsize: int
    count: int
    vocab_size: int
    eos_id: int
    docs: int
    tokenizer_digest: bytes
    version: int = VERSION

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(f"<u{self.itemsize}")

    def pack(self) -> bytes:
        return HEADER.pack(
            MAGIC,
            self.version,
            self.itemsize,
            self.count,
            self.vocab_size,
            self.eos_id,
            self.docs,
            self.tokenizer_digest,
        )


def read_header(path: Path | str) -> ShardHeader:
    """Parse and check a shard's header and length; raise UsageError naming the file."""
    from llmctl.files import display, open_regular

    path = Path(path)
    with open_regular(path, "token shard") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(HEADER_BYTES)
    where = display(path)
    if len(raw) < HEADER_BYTES or not raw.startswith(MAGIC):
        raise UsageError(f"{where}: not an llmctl token shard (bad magic)")
    _, version, itemsize, count, vocab, eos, docs, digest = HEADER.unpack(raw)
    if version != VERSION:
        raise UsageError(f"{where}: token shard format version {version}, expected {VERSION}")
    if itemsize not in (2, 4):
        raise UsageError(f"{where}: unknown token size {itemsize} bytes")
    if itemsize != token_dtype(vocab).itemsize or eos >= vocab:
        raise UsageError(f"{where}: inconsistent header (vocab {vocab}, {itemsize}-byte tokens)")
    want = HEADER_BYTES + count * itemsize
    if size != want:
        what = "truncated" if size < want else "has trailing bytes"
        raise UsageError(f"{where}: {what}: {size} bytes, header says {want} ({count:,} tokens)")
    return ShardHeader(itemsize, count, vocab, eos, docs, digest, version)


def check_ids(path: Path | str, tokens: np.ndarray, vocab_size: int) -> None:
    """UsageError naming the shard when a token id is not below the header's vocabulary size
    (an embedding lookup would fail far from the cause). Reads the tokens in 64 MiB pieces."""
    step = 1 << 25
    top = max((int(tokens[i : i + step].max()) for i in range(0, len(tokens), step)), default=-1)
    if top >= vocab_size:
        from llmctl.files import display

        raise UsageError(f"{display(path)}: token id {top} is not below vocab size {vocab_size}")


def read_shard(path: Path | str) -> np.ndarray:
    """The tokens of a checked shard, memory-mapped read-only (nothing is loaded up front)."""
    h = read_header(path)
    if h.count == 0:
        return np.zeros(0, dtype=h.dtype)
    return np.memmap(path, dtype=h.dtype, mode="r", offset=HEADER_BYTES, shape=(h.count,))


class ShardWriter:
    """Token arrays into `PREFIX-NNNNN.bin` files of at most `shard_tokens` tokens each.

    At least one shard is written (possibly empty), so readers find a fixed file set. The
    header is written last, so a crash never leaves a file whose header claims missing tokens.

    Example:
        with ShardWriter(dir, "train", 100_000_000, vocab_size=8192, eos_id=1) as w:
            w.write(np.array([5, 9, 1]))
    """

    def __init__(
        self,
        dir: Path | str,
        prefix: str,
        shard_tokens: int,
        *,
        vocab_size: int,
        eos_id: int,
        tokenizer_digest: bytes = b"\0" * 8,
    ) -> None:
        if shard_tokens < 1:
            raise UsageError(f"shard_tokens must be positive (got {shard_tokens})")
        self.dir, self.prefix, self.shard_tokens = Path(dir), prefix, shard_tokens
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.digest = tokenizer_digest[:8].ljust(8, b"\0")
        self.dtype = token_dtype(vocab_size)
        self.names: list[str] = []
        self.tokens = 0  # written so far, all shards
        self.docs = 0  # eos tokens written so far, all shards
        self._f = None
        self._count = 0
        self._docs = 0
        self.dir.mkdir(parents=True, exist_ok=True)
        self._open()

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.names):05d}.bin"
        self.names.append(name)
        self._f = open(self.dir / name, "wb")  # noqa: SIM115 (open across write calls)
        self._f.write(b"\0" * HEADER_BYTES)
        self._count = self._docs = 0

    def _finish(self) -> None:
        assert self._f is not None
        header = ShardHeader(
            self.dtype.itemsize, self._count, self.vocab_size, self.eos_id, self._docs, self.digest
        )
        self._f.seek(0)
        self._f.write(header.pack())
        self._f.close()
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        """Append tokens; each eos among them ends a document (counted in the header)."""
        ids = np.asarray(ids)
        if ids.size and (int(ids.max()) >= self.vocab_size or int(ids.min()) < 0):
            raise ValueError(f"token id out of range for vocab_size {self.vocab_size}")
        ids = ids.astype(self.dtype, copy=False)
        pos = 0
        while pos < ids.size:
            if self._count == self.shard_tokens:
                self._finish()
                self._open()
            take = min(self.shard_tokens - self._count, ids.size - pos)
            chunk = ids[pos : pos + take]
            assert self._f is not None
            self._f.write(chunk.tobytes())
            self._count += take
            self.tokens += take
            pos += take
            ends = int(np.count_nonzero(chunk == self.eos_id))
            self._docs += ends
            self.docs += ends

    def close(self) -> list[str]:
        if self._f is not None:
            self._finish()
        return self.names

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split_shards(artifact: Path | str, split: str) -> list[Path]:
    """The shard files of `split` that a tokens artifact's manifest lists, in order (a file
    the manifest does not list is never read)."""
    from llmctl.artifacts import open_artifact

    if split not in SPLITS:
        raise UsageError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    return open_artifact(artifact, "tokens", verify=False).listed(f"{split}-*.bin")


class TokenStream:
    """Next-token windows of `seq_len + 1` tokens from one split of a tokens artifact.

    `sample(step)` gives the `[batch_size, seq_len + 1]` int64 batch for a training step
    (shuffled, deterministic in seed, step and rank). `sequential()` yields the split's
    non-overlapping windows in order, for evaluation. `verify=True` checks every file's sha256
    against the manifest first (seconds per GB); the shard headers and lengths are always checked.
    """

    def __init__(
        self,
        artifact: Path | str,
        split: str,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        *,
        rank: int = 0,
        world_size: int = 1,
        verify: bool = True,
    ) -> None:
        from llmctl.artifacts import open_artifact

        if batch_size < 1 or seq_len < 1:
            raise UsageError(f"batch_size and seq_len must be positive ({batch_size}, {seq_len})")
        if not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} out of range for world_size {world_size}")
        self.manifest = open_artifact(artifact, "tokens", verify=verify)
        self.split, self.batch_size, self.seq_len, self.seed = split, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        if split not in SPLITS:
            raise UsageError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
        paths = self.manifest.listed(f"{split}-*.bin")
        if not paths:
            raise UsageError(f"{self.manifest.path}: no {split}-*.bin shards")
        headers = [read_header(p) for p in paths]
        first = headers[0]
        for p, h in zip(paths, headers, strict=True):
            if (h.vocab_size, h.eos_id, h.tokenizer_digest) != (
                first.vocab_size,
                first.eos_id,
                first.tokenizer_digest,
            ):
                raise UsageError(f"{p}: made by a different tokenizer than {paths[0].name}")
        self.vocab_size, self.eos_id = first.vocab_size, first.eos_id
        used = [p for p, h in zip(paths, headers, strict=True) if h.count]
        self._shards = [read_shard(p) for p in used]
        for p, shard in zip(used, self._shards, strict=True):
            check_ids(p, shard, self.vocab_size)
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])
        self.tokens = int(self._starts[-1])
        span = seq_len + 1
        if self.tokens < span:
            raise UsageError(
                f"{self.manifest.path}: the {split} split has {self.tokens:,} tokens, fewer than "
                f"seq_len + 1 = {span}; use a shorter seq_len or more data"
            )
        # Windows per epoch: keep one window's worth of slack (when there is room) so that each
        # epoch can start at a different shift and see different window boundaries.
        full = (self.tokens - 1) // seq_len
        self.windows_per_epoch = full - 1 if full >= 2 else full
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    def _window(self, start: int) -> np.ndarray:
        """Tokens [start, start + seq_len + 1) of the split, across shard boundaries."""
        end = start + self.seq_len + 1
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        parts = []
        while start < end:
            lo = start - int(self._starts[i])
            take = min(end - start, len(self._shards[i]) - lo)
            parts.append(self._shards[i][lo : lo + take])
            start += take
            i += 1
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            slack = (self.tokens - 1) - self.windows_per_epoch * self.seq_len
            self._shift = int(rng.integers(0, min(slack, self.seq_len - 1) + 1))
            self._perm = rng.permutation(self.windows_per_epoch)
            self._perm_epoch = epoch
        return self._perm, self._shift

    def sample(self, step: int) -> np.ndarray:
        """The int64 `[batch_size, seq_len + 1]` batch of training step `step` on this rank."""
        out = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        first = (step * self.world_size + self.rank) * self.batch_size
        for b in range(self.batch_size):
            epoch, k = divmod(first + b, self.windows_per_epoch)
            perm, shift = self._epoch(epoch)
            out[b] = self._window(shift + int(perm[k]) * self.seq_len)
        return out

    def epoch_of(self, step: int) -> float:
        """How many epochs `step` batches (on all ranks) amount to."""
        seen = step * self.world_size * self.batch_size
        return seen / self.windows_per_epoch

    def sequential(self, max_batches: int | None = None) -> Iterator[np.ndarray]:
        """Non-overlapping windows in order, `batch_size` at a time (the last batch may be
        smaller); under data parallelism each rank gets every `world_size`-th batch."""
        n = (self.tokens - 1) // self.seq_len
        yielded = 0
        for index, first in enumerate(range(0, n, self.batch_size)):
            if index % self.world_size != self.rank:
                continue
            if max_batches is not None and yielded >= max_batches:
                return
            last = min(first + self.batch_size, n)
            yield np.stack([self._window(w * self.seq_len) for w in range(first, last)]).astype(
                np.int64
            )
            yielded += 1
