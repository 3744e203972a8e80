"""llama2.c import: model files of versions 0/1/2 and tok*.bin tokenizers, checked against a
direct NumPy computation of the format (written here, following llama2.c's run.c)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from llmctl.model import llama2c

DIMS = dict(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, seq_len=16)


def random_weights(rng: np.random.Generator, shared: bool, **d: int) -> dict[str, np.ndarray]:
    """llama2.c-layout weights (rows out x in; q/k rotate interleaved pairs)."""
    L, dim, hid, v = d["n_layers"], d["dim"], d["hidden_dim"], d["vocab_size"]
    kv = d["n_kv_heads"] * dim // d["n_heads"]
    r = lambda *s: rng.normal(0, 0.2, s).astype(np.float32)  # noqa: E731
    w = {
        "tok_emb": r(v, dim), "rms_att": 1 + r(L, dim), "wq": r(L, dim, dim), "wk": r(L, kv, dim),
        "wv": r(L, kv, dim), "wo": r(L, dim, dim), "rms_ffn": 1 + r(L, dim), "w1": r(L, hid, dim),
        "w2": r(L, dim, hid), "w3": r(L, hid, dim), "rms_final": 1 + r(dim),
    }  # fmt: skip
    w["wcls"] = w["tok_emb"] if shared else r(v, dim)
    return w


def q80(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """llama2.c export.py quantize_q80: int8 values and one fp32 scale per group."""
    g = w.reshape(-1, group)
    scale = np.abs(g).max(axis=1) / 127.0
    q = np.round(g / scale[:, None]).astype(np.int8)
    return q.reshape(-1), scale.astype(np.float32)


def write_model(path: Path, w: dict[str, np.ndarray], version: int, shared: bool,
                group: int = 16, **d: int) -> dict[str, np.ndarray]:  # fmt: skip
    """Write a llama2.c model file; returns the weights as a reader should see them."""
    dims = [d[k] for k in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads",
                           "vocab_size", "seq_len")]  # fmt: skip
    mats = ["tok_emb", "wq", "wk", "wv", "wo", "w1", "w2", "w3"] + ([] if shared else ["wcls"])
    norms = ["rms_att", "rms_ffn", "rms_final"]
    out = bytearray()
    seen = dict(w)
    if version == 0:
        dims[5] = dims[5] if shared else -dims[5]
        out += struct.pack("<7i", *dims)
        for k in ["tok_emb", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3",
                  "rms_final"]:  # fmt: skip
            out += w[k].astype("<f4").tobytes()
        hs = d["dim"] // d["n_heads"]
        out += np.zeros(2 * d["seq_len"] * hs // 2, "<f4").tobytes()  # freq_cis
        if not shared:
            out += w["wcls"].astype("<f4").tobytes()
    else:
        head = struct.pack("<Ii7iB", llama2c.MAGIC, version, *dims, int(shared))
        if version == 2:
            head += struct.pack("<i", group)
        out += head + b"\0" * (256 - len(head))
        for k in norms:
            out += w[k].astype("<f4").tobytes()
        for k in mats:
            if version == 1:
                out += w[k].astype("<f4").tobytes()
            else:
                q, s = q80(w[k], group)
                out += q.tobytes() + s.astype("<f4").tobytes()
                seen[k] = (q.astype(np.float32).reshape(-1, group) * s[:, None]).reshape(w[k].shape)
        if shared:
            seen["wcls"] = seen["tok_emb"]
    path.write_bytes(bytes(out))
    return seen


def reference_logits(w: dict[str, np.ndarray], tokens: list[int], **d: int) -> np.ndarray:
    """run.c's forward pass for every position, in float64 (interleaved-pair RoPE)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    dim, nh, nkv = d["dim"], d["n_heads"], d["n_kv_heads"]
    hs = dim // nh

    def rmsnorm(x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * g

    def rope(x: np.ndarray) -> np.ndarray:  # x [T, n*hs]
        x = x.copy()
        for pos in range(x.shape[0]):
            for i in range(0, x.shape[1], 2):
                val = pos * (1.0 / 10000.0 ** ((i % hs) / hs))
                c, s = np.cos(val), np.sin(val)
                a, b = x[pos, i], x[pos, i + 1]
                x[pos, i], x[pos, i + 1] = a * c - b * s, a * s + b * c
        return x

    x = w["tok_emb"][tokens]
    T = len(tokens)
    for layer in range(d["n_layers"]):
        xb = rmsnorm(x, w["rms_att"][layer])
        q = rope(xb @ w["wq"][layer].T)
        k = rope(xb @ w["wk"][layer].T)
        v = xb @ w["wv"][layer].T
        att = np.zeros((T, dim))
        for h in range(nh):
            kh = h // (nh // nkv)
            qs = q[:, h * hs : (h + 1) * hs]
            ks, vs = k[:, kh * hs : (kh + 1) * hs], v[:, kh * hs : (kh + 1) * hs]
            scores = qs @ ks.T / np.sqrt(hs) + np.triu(np.full((T, T), -np.inf), 1)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            att[:, h * hs : (h + 1) * hs] = (p / p.sum(-1, keepdims=True)) @ vs
        x = x + att @ w["wo"][layer].T
        xb = rmsnorm(x, w["rms_ffn"][layer])
        g = xb @ w["w1"][layer].T
        x = x + ((g / (1 + np.exp(-g))) * (xb @ w["w3"][layer].T)) @ w["w2"][layer].T
    return rmsnorm(x, w["rms_final"]) @ w["wcls"].T


@pytest.mark.parametrize(("version", "shared"), [(0, True), (0, False), (1, True), (1, False),
                                                 (2, True), (2, False)])  # fmt: skip
def test_model_logits_equal_the_reference(tmp_path: Path, version: int, shared: bool) -> None:
    rng = np.random.default_rng(version * 2 + shared)
    w = random_weights(rng, shared, **DIMS)
    seen = write_model(tmp_path / "m.bin", w, version, shared, **DIMS)
    model = llama2c.read_model(tmp_path / "m.bin")
    cfg = model.config
    assert (cfg.n_kv_head, cfg.d_ff, cfg.tie_embeddings, cfg.max_seq_len) == (2, 48, shared, 16)
    tokens = [1, 5, 200, 7, 299, 3, 42, 42, 9, 100, 0, 11]
    with torch.no_grad():
        ours = model(torch.tensor([tokens]))[0].double().numpy()
    ref = reference_logits(seen, tokens, **DIMS)
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def test_header_size_disagreement_is_one_line(tmp_path: Path) -> None:
    w = random_weights(np.random.default_rng(0), True, **DIMS)
    path = tmp_path / "m.bin"
    write_model(path, w, 0, True, **DIMS)
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(ValueError, match=r"needs 101,020 bytes but the file has 101,016 \(trunc"):
        llama2c.read_header(path)
    path.write_bytes(data + b"\0" * 8)
    with pytest.raises(ValueError, match="needs 101,020 bytes but the file has 101,028"):
        llama2c.read_header(path)
    path.write_bytes(struct.pack("<7i", 32, 48, 2, 3, 2, 300, 16) + data[28:])
    with pytest.raises(ValueError, match="are inconsistent"):
        llama2c.read_header(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="too short"):
        llama2c.read_header(path)
    path.write_bytes(struct.pack("<Ii", llama2c.MAGIC, 7) + bytes(300))
    with pytest.raises(ValueError, match="export version 7"):
        llama2c.read_header(path)


# ----------------------------------------------------------------------------- tokenizer

MERGED = [" ", "a", "b", "c", "e", "h", "t", " t", "th", " th", "he", " the", "ab", "abc", " a",
          "ca", "cab", "é", "é "]  # fmt: skip


def tiny_vocab(rng: np.random.Generator) -> tuple[list[str], list[float]]:
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)] + MERGED
    scores = [0.0] * 259 + [float(s) for s in rng.permutation(len(MERGED)) - 30.0]
    return pieces, scores


def write_tokenizer(path: Path, pieces: list[str], scores: list[float]) -> None:
    data = bytearray(struct.pack("<i", max(len(p.encode()) for p in pieces)))
    for p, s in zip(pieces, scores, strict=True):
        b = p.encode()
        data += struct.pack("<fi", s, len(b)) + b
    path.write_bytes(bytes(data))


def reference_encode(pieces: list[str], scores: list[float], text: str) -> list[int]:
    """run.c's encode(bos=1, eos=0): dummy prefix, code points or bytes, best-score merges."""
    vocab = {p: i for i, p in enumerate(pieces)}
    tokens = [1] + ([vocab[" "]] if text else [])
    for ch in text:
        tokens += [vocab[ch]] if ch in vocab else [b + 3 for b in ch.encode()]
    while True:
        best, at = -1e10, -1
        for i in range(len(tokens) - 1):
            j = vocab.get(pieces[tokens[i]] + pieces[tokens[i + 1]])
            if j is not None and scores[j] > best:
                best, at, merged = scores[j], i, j
        if at < 0:
            return tokens
        tokens[at : at + 2] = [merged]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tokenizer_matches_llama2c_encoder(tmp_path: Path, seed: int) -> None:
    pieces, scores = tiny_vocab(np.random.default_rng(seed))
    write_tokenizer(tmp_path / "tok.bin", pieces, scores)
    files = llama2c.tokenizer_files(tmp_path / "tok.bin", len(pieces), 16)
    tok = Tokenizer.from_str(files["tokenizer.json"].decode())
    assert tok.get_vocab_size() == len(pieces)
    want = ["<unk>", "<s>", "</s>", "<0x00>", "<0x03>", "▁", "▁t"]
    assert [tok.id_to_token(i) for i in (0, 1, 2, 3, 6, 259, 266)] == want
    texts = ["", "the", "the cab abc", " the  cat é z", "thé\nhe ab€", "cabcabca the the"]
    for text in texts:
        want = reference_encode(pieces, scores, text)
        assert tok.encode(text).ids == want, text
        assert tok.decode(want) == text, text


def test_tokenizer_bad_files(tmp_path: Path) -> None:
    pieces, scores = tiny_vocab(np.random.default_rng(0))
    path = tmp_path / "tok.bin"
    write_tokenizer(path, pieces, scores)
    with pytest.raises(ValueError, match="bytes left after 200 tokens"):
        llama2c.read_tokenizer(path, 200)
    with pytest.raises(ValueError, match="truncated at token 278 of 400"):
        llama2c.read_tokenizer(path, 400)
    write_tokenizer(path, ["a", *pieces[1:]], scores)
    with pytest.raises(ValueError, match="token 0 is 'a', expected '<unk>'"):
        llama2c.read_tokenizer(path, len(pieces))


# shared/ lies beside the checkout (here and in CI); the model itself is never committed.
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "models" / "aidreams260K"


@pytest.mark.skipif(not REAL.is_dir(), reason="the aidreams260K model is not on this machine")
def test_real_model_greedy_from_bos() -> None:
    model = llama2c.read_model(REAL / "aidreams260K.bin")
    files = llama2c.tokenizer_files(REAL / "tok512.bin", 512, 128)
    tok = Tokenizer.from_str(files["tokenizer.json"].decode())
    ids = tok.encode("").ids
    assert ids == [1]
    with torch.no_grad():
        for _ in range(24):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert tok.decode(ids).startswith('"Echoes of vectors unfold, a gentle hum of precision, as I')


def test_cli_import_then_generate_from_bos_equals_the_reference(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from llmctl.artifacts import open_artifact
    from llmctl.cli import app

    pieces, scores = tiny_vocab(np.random.default_rng(0))
    dims = {**DIMS, "vocab_size": len(pieces)}
    w = random_weights(np.random.default_rng(5), False, **dims)
    w = {k: v * 3 for k, v in w.items()}  # sharper logits: no near-ties in the greedy choice
    seen = write_model(tmp_path / "m.bin", w, 1, False, **dims)
    write_tokenizer(tmp_path / "tok.bin", pieces, scores)
    runner = CliRunner()
    ckpt = tmp_path / "ckpt"
    r = runner.invoke(app, ["import", "llama2c", str(tmp_path / "m.bin"), str(tmp_path / "tok.bin"),
                            "--out", str(ckpt), "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert open_artifact(ckpt, "checkpoint").stats["llama2c_version"] == 1
    ids = [1]
    while len(ids) < 13:
        nxt = int(reference_logits(seen, ids, **dims)[-1].argmax())
        if nxt == 2:
            break
        ids.append(nxt)
    assert len(ids) > 5  # a real continuation, not an immediate EOS
    want = Tokenizer.from_file(str(ckpt / "tokenizer.json")).decode(ids[1:])
    r = runner.invoke(app, ["generate", str(ckpt), "--prompt", "", "--max-new-tokens", "12",
                            "--dtype", "float32", "--device", "cpu", "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert r.stdout == want + "\n"
    # the header disagrees with the file's size: one line, exit 2, nothing written
    (tmp_path / "m.bin").write_bytes((tmp_path / "m.bin").read_bytes()[:-1])
    r = runner.invoke(app, ["import", "llama2c", str(tmp_path / "m.bin"), str(tmp_path / "tok.bin"),
                            "--out", str(tmp_path / "bad")])  # fmt: skip
    assert r.exit_code == 2 and "needs" in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "bad").exists()
