"""Token shards (header, sharding, damage detection) and the TokenStream batches read from them."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmctl.artifacts import building
from llmctl.data.tokens import (
    HEADER,
    HEADER_BYTES,
    MAGIC,
    ShardWriter,
    TokenStream,
    read_header,
    read_shard,
    token_dtype,
)
from llmctl.errors import UsageError

DIGEST = bytes(range(1, 9))


def test_dtype_follows_the_vocabulary() -> None:
    assert token_dtype(8192) == np.uint16
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_header_and_sharding(tmp_path: Path) -> None:
    ids = np.array([5, 6, 1, 7, 8, 9, 1, 4, 1, 3, 3, 3, 2, 1, 9, 9, 9, 9, 9, 1, 4, 4, 4, 4, 1])
    with ShardWriter(tmp_path, "train", 10, vocab_size=300, eos_id=1, tokenizer_digest=DIGEST) as w:
        w.write(ids[:4])
        w.write(ids[4:])
    assert w.names == ["train-00000.bin", "train-00001.bin", "train-00002.bin"]
    assert (w.tokens, w.docs) == (25, 6)
    got = [read_shard(tmp_path / n) for n in w.names]
    assert [len(g) for g in got] == [10, 10, 5]
    assert np.array_equal(np.concatenate(got), ids)
    h = read_header(tmp_path / "train-00001.bin")
    assert (h.version, h.itemsize, h.count, h.vocab_size, h.eos_id, h.docs) == (1, 2, 10, 300, 1, 2)
    assert h.tokenizer_digest == DIGEST
    raw = (tmp_path / "train-00000.bin").read_bytes()
    assert raw[:8] == b"LLMTOK\0\0" and len(raw) == HEADER_BYTES + 10 * 2
    assert struct.unpack_from("<Q", raw, 16) == (10,)
    assert np.frombuffer(raw[HEADER_BYTES:], "<u2").tolist() == ids[:10].tolist()


def test_uint32_shards_and_empty_split(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "train", 100, vocab_size=100_000, eos_id=1) as w:
        w.write(np.array([99_999, 70_000, 1]))
    assert read_shard(tmp_path / "train-00000.bin").dtype == np.uint32
    assert read_shard(tmp_path / "train-00000.bin").tolist() == [99_999, 70_000, 1]
    with ShardWriter(tmp_path, "val", 100, vocab_size=100_000, eos_id=1) as w:
        pass
    assert w.names == ["val-00000.bin"]
    assert read_shard(tmp_path / "val-00000.bin").size == 0
    with pytest.raises(ValueError, match="out of range"):
        ShardWriter(tmp_path, "x", 10, vocab_size=50, eos_id=1).write(np.array([50]))


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    with ShardWriter(tmp_path, "train", 1000, vocab_size=512, eos_id=1) as w:
        w.write(np.arange(100) % 512)
    return tmp_path / "train-00000.bin"


def test_truncated_shard_is_refused(shard: Path) -> None:
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])
    with pytest.raises(UsageError, match=r"train-00000.bin: truncated: 263 bytes, header says 264"):
        read_shard(shard)
    shard.write_bytes(data + b"\0\0")
    with pytest.raises(UsageError, match=r"train-00000.bin: has trailing bytes"):
        read_shard(shard)
    shard.write_bytes(data[:30])
    with pytest.raises(UsageError, match="not an llmctl token shard"):
        read_shard(shard)


def test_foreign_and_future_files_are_refused(shard: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.bin"
    foreign.write_bytes(np.arange(200, dtype=np.uint16).tobytes())  # nanoGPT-style raw tokens
    with pytest.raises(UsageError, match=r"foreign.bin: not an llmctl token shard \(bad magic\)"):
        read_shard(foreign)
    data = bytearray(shard.read_bytes())
    data[8:12] = struct.pack("<I", 2)
    shard.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="format version 2, expected 1"):
        read_shard(shard)
    data[8:12] = struct.pack("<I", 1)
    data[12:16] = struct.pack("<I", 4)  # claims uint32 tokens for a 512-token vocabulary
    shard.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="inconsistent header"):
        read_shard(shard)


def make_artifact(out: Path, n: int, shard_tokens: int, val: int = 0) -> Path:
    """A tokens artifact whose token i has value i (so a window shows where it starts)."""
    vocab = 1 << 20
    with building(out, kind="tokens", command="test", config={}) as art:
        for split, count in (("train", n), ("val", val)):
            w = ShardWriter(art.dir, split, shard_tokens, vocab_size=vocab, eos_id=1)
            for start in range(0, count, shard_tokens):
                w.write(np.arange(start, min(start + shard_tokens, count)))
            w.close()
    return out


def test_sample_is_deterministic_and_covers_each_window_once_per_epoch(tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "tok", n=1000, shard_tokens=137)
    s = TokenStream(art, "train", batch_size=4, seq_len=16, seed=3)
    assert s.tokens == 1000 and s.windows_per_epoch == 61  # (999 // 16) - 1, one kept as slack
    a = s.sample(5)
    assert a.shape == (4, 17) and a.dtype == np.int64
    # Every row is a contiguous run of the stream, even across the 137-token shard boundaries.
    assert (np.diff(a, axis=1) == 1).all()
    assert np.array_equal(TokenStream(art, "train", 4, 16, seed=3).sample(5), a)
    assert not np.array_equal(TokenStream(art, "train", 4, 16, seed=4).sample(5), a)
    # One epoch: 61 windows, all distinct, all with the epoch's shift, none overlapping.
    one = TokenStream(art, "train", batch_size=1, seq_len=16, seed=3)
    starts = [int(one.sample(k)[0, 0]) for k in range(61)]
    assert len(set(starts)) == 61
    assert len({x % 16 for x in starts}) == 1
    assert max(starts) + 17 <= 1000


def test_ranks_split_the_global_batch_sequence(tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "tok", n=2000, shard_tokens=500)
    whole = TokenStream(art, "train", batch_size=2, seq_len=8, seed=0)
    ranks = [TokenStream(art, "train", 2, 8, 0, rank=r, world_size=2) for r in (0, 1)]
    for step in range(3):
        got = np.concatenate([ranks[0].sample(step), ranks[1].sample(step)])
        want = np.concatenate([whole.sample(2 * step), whole.sample(2 * step + 1)])
        assert np.array_equal(got, want)


def test_sequential_reads_every_window_in_order(tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "tok", n=100, shard_tokens=1000, val=53)
    val = TokenStream(art, "val", batch_size=2, seq_len=10)
    batches = list(val.sequential())
    assert [b.shape for b in batches] == [(2, 11), (2, 11), (1, 11)]
    assert [int(r[0]) for b in batches for r in b] == [0, 10, 20, 30, 40]
    assert len(list(val.sequential(max_batches=2))) == 2
    r1 = list(TokenStream(art, "val", 2, 10, rank=1, world_size=2).sequential())
    assert [int(r[0]) for b in r1 for r in b] == [20, 30]


def test_stream_errors_name_the_problem(tmp_path: Path) -> None:
    art = make_artifact(tmp_path / "tok", n=100, shard_tokens=1000, val=5)
    with pytest.raises(UsageError, match="the val split has 5 tokens, fewer than seq_len"):
        TokenStream(art, "val", batch_size=1, seq_len=10)
    with pytest.raises(UsageError, match="unknown split 'test'"):
        TokenStream(art, "test", batch_size=1, seq_len=10)
    mixed = make_artifact(tmp_path / "mixed", n=100, shard_tokens=50)
    with open(mixed / "train-00001.bin", "r+b") as f:  # another tokenizer's digest
        f.seek(40)
        f.write(b"otherTok")
    with pytest.raises(UsageError, match=r"train-00001.bin: made by a different tokenizer"):
        TokenStream(mixed, "train", batch_size=1, seq_len=10, verify=False)
    (art / "train-00000.bin").write_bytes(b"LLMTOK")
    with pytest.raises(UsageError, match="size differs from the manifest"):
        TokenStream(art, "train", batch_size=1, seq_len=10)


# Headers with every field drawn near its valid values, so the fuzz reaches each check.
HEADERS = st.builds(
    lambda *f: HEADER.pack(MAGIC, *f),
    st.sampled_from([0, 1, 2]),
    st.sampled_from([0, 1, 2, 4, 8]),
    st.integers(0, 40) | st.integers(0, 2**64 - 1),
    st.sampled_from([0, 1, 255, 65536, 65537, 2**32 - 1]),
    st.integers(0, 2) | st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.binary(min_size=8, max_size=8),
)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=100), st.tuples(HEADERS, st.binary(max_size=80))))
def test_any_bytes_read_as_a_shard_or_raise_usage_error(data: bytes | tuple[bytes, bytes]) -> None:
    raw = data if isinstance(data, bytes) else data[0] + data[1]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train-00000.bin"
        path.write_bytes(raw)
        try:
            tokens = read_shard(path)
        except UsageError as e:
            assert str(e).startswith(f"{path}: ")
            return
        h = read_header(path)
        assert tokens.dtype == h.dtype and len(tokens) == h.count
        assert len(raw) == HEADER_BYTES + h.count * h.itemsize
        del tokens  # the memory map, before the directory goes
