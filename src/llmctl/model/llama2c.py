"""Read karpathy/llama2.c exports: a model `.bin` into our GPT, a `tok*.bin` into tokenizer.json.

Model files (all little-endian):
- version 0 ("legacy", `run.c`'s own format): 7 int32 (dim, hidden_dim, n_layers, n_heads,
  n_kv_heads, vocab_size, seq_len; a negative vocab_size means an untied classifier), then fp32
  token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final, the freq_cis
  real/imag tables [seq_len, head_size/2] (unused) and, when untied, wcls.
- version 1: a 256-byte header (uint32 magic "ak42", int32 version, the 7 ints, a uint8
  shared-classifier flag), then fp32 norms (rms_att, rms_ffn, rms_final), token_embedding,
  wq, wk, wv, wo, w1, w2, w3 and wcls when not shared.
- version 2: the same header plus an int32 group size; fp32 norms, then each matrix of the
  version-1 order as Q8_0: all its int8 values, then its fp32 scales (one per group).

llama2.c rotates interleaved pairs (x[2i], x[2i+1]); our GPT rotates halves (x[i], x[i+d/2]),
as transformers' Llama does, so the rows of wq and wk are permuted exactly as transformers'
`convert_llama_weights_to_hf.py` does. The model is then the same function.

Tokenizer files: int32 max_token_length, then per token a float32 score, an int32 byte length
and the bytes. Id 0 is `<unk>`, 1 BOS, 2 EOS, then the 256 byte-fallback tokens `<0xXX>`,
then merged pieces where a space marks a word start. They become a SentencePiece-style BPE
`tokenizer.json` (byte fallback, merges ranked by the merged piece's score, as llama2.c's
encoder picks the best-scoring pair first).

Example:
    >>> model = read_model("stories15M.bin")
    >>> files = tokenizer_files("tok512.bin", vocab_size=model.config.vocab_size)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmctl.files import check_regular, open_regular, read_bytes
from llmctl.model.gpt import GPT, GPTConfig

MAGIC = 0x616B3432  # "ak42"
HEADER_V12 = 256
_LIMIT = 1 << 24  # no dimension of a real model comes near this; bigger means a foreign file


@dataclass(frozen=True)
class Header:
    """The hyperparameters of a llama2.c model file and where its weights start."""

    version: int
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared: bool
    group_size: int
    offset: int

    @property
    def head_size(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_size

    def matrices(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of the weight matrices in file order (versions 1 and 2)."""
        L, d, h, kv, v = self.n_layers, self.dim, self.hidden_dim, self.kv_dim, self.vocab_size
        mats = [
            ("tok_emb", (v, d)),
            ("wq", (L, d, d)),
            ("wk", (L, kv, d)),
            ("wv", (L, kv, d)),
            ("wo", (L, d, d)),
            ("w1", (L, h, d)),
            ("w2", (L, d, h)),
            ("w3", (L, h, d)),
        ]
        return mats if self.shared else [*mats, ("wcls", (v, d))]

    def norms(self) -> list[tuple[str, tuple[int, ...]]]:
        L, d = self.n_layers, self.dim
        return [("rms_att", (L, d)), ("rms_ffn", (L, d)), ("rms_final", (d,))]

    def expected_bytes(self) -> int:
        n = lambda shape: int(np.prod(shape))  # noqa: E731
        if self.version == 0:
            freq = self.seq_len * (self.head_size // 2)
            body = sum(n(s) for _, s in [*self.matrices(), *self.norms()]) + 2 * freq
            return self.offset + 4 * body
        if self.version == 1:
            return self.offset + 4 * sum(n(s) for _, s in [*self.norms(), *self.matrices()])
        norms = 4 * sum(n(s) for _, s in self.norms())
        mats = sum(n(s) + 4 * (n(s) // self.group_size) for _, s in self.matrices())
        return self.offset + norms + mats

    def config(self) -> GPTConfig:
        """Our GPTConfig for this model (Llama 2 architecture, RMSNorm eps 1e-5, theta 10000)."""
        return GPTConfig(
            vocab_size=self.vocab_size,
            n_layer=self.n_layers,
            n_head=self.n_heads,
            n_kv_head=self.n_kv_heads,
            d_model=self.dim,
            d_ff=self.hidden_dim,
            max_seq_len=self.seq_len,
            norm="rmsnorm",
            mlp="swiglu",
            pos="rope",
            tie_embeddings=self.shared,
            bias=False,
            rope_theta=10000.0,
            norm_eps=1e-5,
        )


def read_header(path: str | Path) -> Header:
    """Parse and check a llama2.c model header; ValueError (naming the file) when the header
    is implausible or disagrees with the file's size."""
    path = Path(path)
    try:
        size = check_regular(path, "llama2.c model").st_size
        with open_regular(path, "llama2.c model") as f:
            head = f.read(HEADER_V12)
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    if len(head) < 28:
        raise ValueError(f"{path}: {size} bytes, too short for a llama2.c header")
    (magic,) = struct.unpack_from("<I", head, 0)
    if magic == MAGIC:
        if len(head) < HEADER_V12:
            raise ValueError(f"{path}: truncated header ({size} of {HEADER_V12} bytes)")
        (version,) = struct.unpack_from("<i", head, 4)
        if version not in (1, 2):
            raise ValueError(f"{path}: llama2.c export version {version} (supported: 0, 1, 2)")
        dims = struct.unpack_from("<7i", head, 8)
        shared = bool(head[36])
        group = struct.unpack_from("<i", head, 37)[0] if version == 2 else 0
        offset = HEADER_V12
    else:
        version, offset, group = 0, 28, 0
        dims = struct.unpack_from("<7i", head, 0)
        shared = dims[5] > 0
        dims = (*dims[:5], abs(dims[5]), dims[6])
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = dims
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    for name, value in zip(names, dims, strict=True):
        if not 0 < value < _LIMIT:
            raise ValueError(f"{path}: header {name}={value} is not a llama2.c model")
    if dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise ValueError(
            f"{path}: header dim={dim}, n_heads={n_heads}, n_kv_heads={n_kv} are inconsistent"
        )
    if version == 2 and not 0 < group <= dim:
        raise ValueError(f"{path}: header group_size={group} is invalid")
    header = Header(version, dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared,
                    group, offset)  # fmt: skip
    if version == 2:
        bad = [n for n, s in header.matrices() if int(np.prod(s)) % group]
        if bad:
            raise ValueError(f"{path}: group_size={group} does not divide {bad[0]}")
    want = header.expected_bytes()
    if size != want:
        raise ValueError(
            f"{path}: header (version {version}, dim={dim}, layers={n_layers}, vocab={vocab}) "
            f"needs {want:,} bytes but the file has {size:,}"
            + (" (truncated)" if size < want else "")
        )
    return header


def _read_arrays(path: Path, h: Header) -> dict[str, np.ndarray]:
    data = np.memmap(path, dtype=np.uint8, mode="r")
    pos = h.offset
    out: dict[str, np.ndarray] = {}

    def take(dtype: type, count: int) -> np.ndarray:
        nonlocal pos
        nbytes = count * np.dtype(dtype).itemsize
        arr = np.frombuffer(
            data[pos : pos + nbytes].tobytes(), dtype=np.dtype(dtype).newbyteorder("<")
        )
        pos += nbytes
        return arr

    def f32(shape: tuple[int, ...]) -> np.ndarray:
        return take(np.float32, int(np.prod(shape))).reshape(shape)

    norms, mats = dict(h.norms()), dict(h.matrices())
    if h.version == 0:
        order = ["tok_emb", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
                 "rms_final"]  # fmt: skip
        shapes = {**norms, **mats}
        for name in order:
            out[name] = f32(shapes[name])
        take(np.float32, 2 * h.seq_len * (h.head_size // 2))  # freq_cis, recomputed by RoPE
        if not h.shared:
            out["wcls"] = f32(mats["wcls"])
    elif h.version == 1:
        for name, shape in [*h.norms(), *h.matrices()]:
            out[name] = f32(shape)
    else:
        for name, shape in h.norms():
            out[name] = f32(shape)
        for name, shape in h.matrices():
            n = int(np.prod(shape))
            q = take(np.int8, n).astype(np.float32).reshape(-1, h.group_size)
            scale = take(np.float32, n // h.group_size)
            out[name] = (q * scale[:, None]).reshape(shape)
    return out


def _interleaved_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection reordered so rotate-half RoPE equals interleaved-pair RoPE
    (transformers' convert_llama_weights_to_hf.py `permute`)."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def read_model(path: str | Path) -> GPT:
    """Our GPT (fp32, eval mode) with the weights of a llama2.c model file.
    ValueError naming the file for a bad header, a size mismatch or non-finite weights."""
    path = Path(path)
    h = read_header(path)
    a = _read_arrays(path, h)
    for name, arr in a.items():
        if not np.isfinite(arr).all():
            raise ValueError(f"{path}: weights {name} hold NaN or infinite values")
    state: dict[str, np.ndarray] = {"tok_emb.weight": a["tok_emb"], "norm_f.weight": a["rms_final"]}
    for i in range(h.n_layers):
        p = f"blocks.{i}."
        state |= {
            p + "norm1.weight": a["rms_att"][i],
            p + "norm2.weight": a["rms_ffn"][i],
            p + "attn.q_proj.weight": _interleaved_to_halves(a["wq"][i], h.n_heads),
            p + "attn.k_proj.weight": _interleaved_to_halves(a["wk"][i], h.n_kv_heads),
            p + "attn.v_proj.weight": a["wv"][i],
            p + "attn.o_proj.weight": a["wo"][i],
            p + "mlp.gate_proj.weight": a["w1"][i],
            p + "mlp.down_proj.weight": a["w2"][i],
            p + "mlp.up_proj.weight": a["w3"][i],
        }
    if not h.shared:
        state["lm_head.weight"] = a["wcls"]
    with torch.device("meta"):
        model = GPT(h.config())
    tensors = {
        k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in state.items()
    }
    model.load_state_dict(tensors, strict=False, assign=True)
    if h.shared:
        model.lm_head.weight = model.tok_emb.weight
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:  # a mapping bug, never the user's file
        raise AssertionError(f"llama2c: unmapped parameters {missing}")
    return model.eval()


# ----------------------------------------------------------------------------- tokenizer

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPACE = "\u2581"  # SentencePiece's word-start mark


@dataclass(frozen=True)
class Vocab:
    """A llama2.c tokenizer: pieces (text, spaces as spaces) and scores, by id."""

    pieces: list[str]
    scores: list[float]
    max_token_length: int


def read_tokenizer(path: str | Path, vocab_size: int) -> Vocab:
    """Parse a llama2.c `tok*.bin` holding `vocab_size` tokens (the model header's count);
    ValueError naming the file when it is truncated, too long or not UTF-8."""
    path = Path(path)
    try:
        data = read_bytes(path, what="llama2.c tokenizer")
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes, too short for a llama2.c tokenizer")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len < 4096:
        raise ValueError(f"{path}: max_token_length={max_len} is not a llama2.c tokenizer")
    pos, pieces, scores = 4, [], []
    for i in range(vocab_size):
        if pos + 8 > len(data):
            raise ValueError(f"{path}: truncated at token {i} of {vocab_size}")
        score, n = struct.unpack_from("<fi", data, pos)
        pos += 8
        if not 0 <= n <= max_len or pos + n > len(data):
            raise ValueError(f"{path}: token {i} has a bad length {n} (or the file is truncated)")
        try:
            pieces.append(data[pos : pos + n].decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path}: token {i} is not valid UTF-8") from None
        if not np.isfinite(score):
            raise ValueError(f"{path}: token {i} has a non-finite score")
        scores.append(float(score))
        pos += n
    if pos != len(data):
        raise ValueError(
            f"{path}: {len(data) - pos} bytes left after {vocab_size} tokens "
            "(the tokenizer does not belong to this model)"
        )
    # llama2.c's exporter writes BOS/EOS as "\n<s>\n" and "\n</s>\n" for its own printing.
    fixed = {0: UNK, 1: BOS, 2: EOS}
    for i, want in fixed.items():
        if i < len(pieces) and pieces[i].strip() != want:
            raise ValueError(f"{path}: token {i} is {pieces[i]!r}, expected {want!r}")
        pieces[i] = want
    for b in range(256):
        if 3 + b >= len(pieces) or pieces[3 + b] != f"<0x{b:02X}>":
            raise ValueError(f"{path}: token {3 + b} should be the byte token <0x{b:02X}>")
    if len(set(pieces)) != len(pieces):
        raise ValueError(f"{path}: the vocabulary holds duplicate pieces")
    return Vocab(pieces, scores, max_len)


def tokenizer_json(vocab: Vocab) -> dict[str, Any]:
    """A transformers-loadable `tokenizer.json` equivalent to llama2.c's encoder/decoder:
    a dummy-prefix space, byte fallback for characters outside the vocabulary, and merges of
    every (a, b) with a+b in the vocabulary, the best-scoring merged piece first."""
    spm = [p.replace(" ", SPACE) if i > 258 else p for i, p in enumerate(vocab.pieces)]
    ids = {p: i for i, p in enumerate(spm)}
    merges: list[tuple[float, int, str, str]] = []
    for i, piece in enumerate(spm):
        if i < 259 or len(piece) < 2:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            # byte tokens and specials never merge in llama2.c's encoder
            if ids.get(left, 0) >= 259 and ids.get(right, 0) >= 259:
                merges.append((-vocab.scores[i], i, left, right))
    merges.sort()
    special = {
        i: {"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}
        for i, p in enumerate(spm[:3])
    }  # fmt: skip
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": list(special.values()),
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": SPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": bos_template(BOS, 1),
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": UNK,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": ids,
            "merges": [[a, b] for _, _, a, b in merges],
        },
    }


def bos_template(bos: str, bos_id: int) -> dict[str, Any]:
    """A post-processor that puts `bos` before every sequence (what `add_bos_token` means)."""
    return {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"SpecialToken": {"id": bos, "type_id": 1}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def tokenizer_files(path: str | Path, vocab_size: int, model_max_length: int) -> dict[str, bytes]:
    """`tokenizer.json` and `tokenizer_config.json` (as bytes) for a llama2.c tokenizer file."""
    vocab = read_tokenizer(path, vocab_size)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(i): {
                "content": p,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, p in enumerate((UNK, BOS, EOS))
        },
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    dump = lambda d: (json.dumps(d, indent=2, ensure_ascii=False) + "\n").encode()  # noqa: E731
    return {"tokenizer.json": dump(tokenizer_json(vocab)), "tokenizer_config.json": dump(config)}
