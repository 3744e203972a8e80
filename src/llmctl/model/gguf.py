"""Write a checkpoint as one GGUF file (llama.cpp, Ollama) with the `gguf` package of llama.cpp.

What goes in: the architecture metadata (`llama` for RoPE/RMSNorm/SwiGLU models, `gpt2` for
learned positions/LayerNorm/GELU), the tokenizer (byte-level BPE → `tokenizer.ggml.model=gpt2`
with merges; SentencePiece-style BPE with byte fallback → `llama` with scores), the special
token ids, the chat template, `general.license` and the sources, and every weight in F32, F16,
BF16, Q8_0 or Q4_0. As in llama.cpp's own converter, 1-D tensors (norms, biases) stay F32 and
a matrix whose rows are not a whole number of quantization blocks (32 values) falls back to
F16. llama.cpp's `llama` architecture rotates interleaved pairs (Meta's layout), so q/k rows
are permuted back from our rotate-half layout, as its converter does for transformers models.

Example:
    >>> stats = write_gguf(model, Path("ckpt"), Path("out/model.gguf"), "q8_0", license="MIT")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.model.gpt import GPT
from llmctl.model.hf import hf_layout

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
BLOCK = 32  # values per Q8_0 / Q4_0 block


def _qtypes() -> dict[str, Any]:
    import gguf

    Q = gguf.GGMLQuantizationType
    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}


def _file_type(name: str) -> int:
    import gguf

    F = gguf.LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16,
            "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0}[name]  # fmt: skip


def halves_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows (or entries of a bias) of a q/k projection in llama.cpp's interleaved-pair order."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: GPT) -> dict[str, np.ndarray]:
    """`model`'s weights under llama.cpp's tensor names, fp32 NumPy, in llama.cpp's layout."""
    cfg = model.config
    layout = hf_layout(cfg)
    ours = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": ours["tok_emb.weight"], "output_norm.weight": ours["norm_f.weight"]}
    if layout == "gpt2":
        out["position_embd.weight"] = ours["pos_emb.weight"]
        out["output_norm.bias"] = ours["norm_f.bias"]
        out["output.weight"] = ours["lm_head.weight"]  # llama.cpp's gpt2 reads the head here
    elif not cfg.tie_embeddings:
        out["output.weight"] = ours["lm_head.weight"]
    for i in range(cfg.n_layer):
        b, p = f"blocks.{i}.", f"blk.{i}."
        suffixes = ("weight", "bias") if cfg.bias else ("weight",)
        for s in suffixes:
            q, k = ours[f"{b}attn.q_proj.{s}"], ours[f"{b}attn.k_proj.{s}"]
            v = ours[f"{b}attn.v_proj.{s}"]
            if layout == "gpt2":
                out[f"{p}attn_qkv.{s}"] = np.concatenate([q, k, v])
            else:
                out[f"{p}attn_q.{s}"] = halves_to_interleaved(q, cfg.n_head)
                out[f"{p}attn_k.{s}"] = halves_to_interleaved(k, cfg.n_kv_head)
                out[f"{p}attn_v.{s}"] = v
            out[f"{p}attn_output.{s}"] = ours[f"{b}attn.o_proj.{s}"]
            out[f"{p}ffn_up.{s}"] = ours[f"{b}mlp.up_proj.{s}"]
            out[f"{p}ffn_down.{s}"] = ours[f"{b}mlp.down_proj.{s}"]
            if layout == "llama":
                out[f"{p}ffn_gate.{s}"] = ours[f"{b}mlp.gate_proj.{s}"]
        norms = ("weight", "bias") if layout == "gpt2" else ("weight",)
        for s in norms:
            out[f"{p}attn_norm.{s}"] = ours[f"{b}norm1.{s}"]
            out[f"{p}ffn_norm.{s}"] = ours[f"{b}norm2.{s}"]
    return out


def tensor_type(name: str, shape: tuple[int, ...], wanted: str) -> str:
    """The type a tensor is stored in: F32 for 1-D, F16 for a matrix quantization cannot
    block, else `wanted`."""
    if len(shape) == 1:
        return "f32"
    if wanted in ("q8_0", "q4_0") and shape[-1] % BLOCK:
        return "f16"
    return wanted


# ----------------------------------------------------------------------------- tokenizer


def _token_id(vocab: dict[str, int], value: Any) -> int | None:
    if isinstance(value, dict):  # transformers' AddedToken form
        value = value.get("content")
    return vocab.get(value) if isinstance(value, str) else None


def tokenizer_metadata(dir: Path, vocab_size: int) -> dict[str, Any]:
    """llama.cpp's tokenizer keys from `dir/tokenizer.json` + `tokenizer_config.json`.
    ValueError naming the file for a tokenizer GGUF cannot describe."""
    import gguf

    path = dir / "tokenizer.json"
    tj = json.loads(path.read_text(encoding="utf-8"))
    tc_path = dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: a {model.get('type')} tokenizer; GGUF export handles BPE only")
    vocab: dict[str, int] = dict(model["vocab"])
    special: set[int] = set()
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
        if t.get("special"):
            special.add(t["id"])
    if max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"{path}: token ids reach {max(vocab.values())}, the model has {vocab_size}"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    T = gguf.TokenType
    types = [T.UNUSED] * vocab_size
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = T.CONTROL if i in special else T.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    spm = bool(model.get("byte_fallback"))
    meta: dict[str, Any] = {"tokens": tokens, "merges": merges}
    if spm:
        # llama.cpp's SentencePiece tokenizer merges the best-scoring pair first: rank → score.
        scores = [0.0] * vocab_size
        for rank, m in enumerate(merges):
            i = vocab.get(m.replace(" ", "", 1))
            if i is not None and scores[i] == 0.0:
                scores[i] = -float(rank + 1)
        for i, tok in enumerate(tokens):
            if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                types[i] = T.BYTE
        meta |= {"model": "llama", "scores": scores}
    else:
        meta |= {"model": "gpt2", "pre": "default"}
    unk = _token_id(vocab, tc.get("unk_token", model.get("unk_token")))
    if unk is not None:
        types[unk] = T.UNKNOWN
    # What the post-processor adds is what llmctl and transformers put around a prompt; say
    # it the way llama.cpp can: a leading special becomes its BOS with add_bos_token (for
    # llmctl's own tokenizers that is <|eos|>, the document separator), a trailing one its EOS.
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(path))
    plain, full = t.encode("a", add_special_tokens=False).ids, t.encode("a").ids
    k = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)
    lead, trail = full[:k], full[k + len(plain) :]
    bos = lead[0] if lead else _token_id(vocab, tc.get("bos_token"))
    meta |= {
        "types": [int(t) for t in types],
        "bos": bos,
        "eos": _token_id(vocab, tc.get("eos_token")),
        "pad": _token_id(vocab, tc.get("pad_token")),
        "unk": unk,
        "add_bos": bool(lead),
        "add_eos": bool(trail),
        "chat_template": tc.get("chat_template")
        if isinstance(tc.get("chat_template"), str)
        else None,
    }
    return meta


# ----------------------------------------------------------------------------- writer


def write_gguf(
    model: GPT,
    tokenizer_dir: Path,
    path: Path,
    type: str = "f16",
    *,
    name: str = "",
    license: str = "",
    sources: list[str] | None = None,
) -> dict[str, Any]:
    """Write `model` (+ the tokenizer files in `tokenizer_dir`) to the GGUF file `path`.
    Returns {tensor_types: {type: count}, bytes}. ValueError for a model or tokenizer GGUF
    cannot describe."""
    import gguf

    if type not in TYPES:
        raise ValueError(f"gguf.type must be one of {', '.join(TYPES)}, got {type!r}")
    cfg = model.config
    layout = hf_layout(cfg)
    tok = tokenizer_metadata(Path(tokenizer_dir), cfg.vocab_size)
    w = gguf.GGUFWriter(path, layout)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name or path.stem)
    if license:
        w.add_license(license)
    if sources:
        w.add_array("general.sources", list(sources))
    w.add_file_type(int(_file_type(type)))
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_head)
    if layout == "llama":
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_vocab_size(cfg.vocab_size)
    else:
        w.add_layer_norm_eps(cfg.norm_eps)
    w.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
    if tok["merges"]:
        w.add_token_merges(tok["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                     ("pad", w.add_pad_token_id), ("unk", w.add_unk_token_id)):  # fmt: skip
        if tok[key] is not None:
            add(tok[key])
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])
    qtypes = _qtypes()
    counts: dict[str, int] = {}
    for tname, arr in gguf_tensors(model).items():
        kind = tensor_type(tname, arr.shape, type)
        counts[kind] = counts.get(kind, 0) + 1
        qt = qtypes[kind]
        if kind == "f32":
            w.add_tensor(tname, arr.astype(np.float32))
        elif kind == "f16":
            w.add_tensor(tname, arr.astype(np.float16))
        else:
            w.add_tensor(tname, gguf.quants.quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"tensor_types": dict(sorted(counts.items())), "bytes": path.stat().st_size}


def read_back(path: Path) -> tuple[dict[str, Any], dict[str, tuple[str, np.ndarray]]]:
    """(metadata {key: value}, {tensor name: (type name, dequantized fp32 array)}) of a GGUF
    file, through the `gguf` package's reader (tests, and a check after writing)."""
    import gguf

    r = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    tensors = {}
    for t in r.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        tensors[t.name] = (t.tensor_type.name.lower(), np.asarray(arr, np.float32).reshape(shape))
    return meta, tensors
