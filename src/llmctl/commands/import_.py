"""`llmctl import`: turn a model made elsewhere into a `checkpoint` every command can use.

Formats:
- `hf DIR`: a local transformers folder (`config.json`, `model.safetensors` or shards with
  their index, `tokenizer.json`, `tokenizer_config.json`) of a GPT-2, Llama or Mistral-style
  model (see `model/hf.py` for what is understood and what is refused).
- `llama2c MODEL.bin TOKENIZER.bin`: a karpathy/llama2.c export (versions 0, 1, 2) and its
  `tok*.bin`, turned into a SentencePiece-style `tokenizer.json` (see `model/llama2c.py`).

The checkpoint keeps the model's own special tokens (BOS/EOS/pad/unk from its tokenizer files;
where config.json names other ids the tokenizer files win and the import says so). The
manifest records each source file with its sha256, and the license given with `--license` (or
read from the folder's model card) for `llmctl export` to carry on.

Example:
    llmctl import llama2c stories15M.bin tok512.bin --out out/stories
    llmctl import hf ~/models/TinyLlama-1.1B --out out/tinyllama
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llmctl.artifacts import building, sha256_file
from llmctl.config import helpful, to_dict
from llmctl.errors import UsageError
from llmctl.runtime import human_bytes, info, summary, warn

FORMATS = ("hf", "llama2c")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ImportConfig:
    """Settings of `llmctl import`."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = helpful(
        "auto", "dtype of the saved weights (auto: the source's; llama2.c files are float32)"
    )
    license: str = helpful(
        "", "license of the model (SPDX id), recorded for exports (default: the model card's)"
    )


def run(
    fmt: str, paths: list[Path], out: Path, cfg: ImportConfig, force: bool = False
) -> dict[str, Any]:
    """Import `paths` in format `fmt` into a checkpoint at `out`; returns the manifest stats."""
    from llmctl.model.io import model_type_of, save_checkpoint
    from llmctl.tokenizer import check_fits, load_specials, load_tokenizer

    if fmt not in FORMATS:
        raise UsageError(f"unknown import format {fmt!r}; known: {', '.join(FORMATS)}")
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise UsageError(f"{p}: not found")
    if fmt == "llama2c":
        model, tok_files, sources, notes = _llama2c(paths)
    else:
        model, tok_files, sources, notes = _hf(paths)
    if cfg.dtype != "auto":
        model = model.to(getattr(torch, cfg.dtype))
    license = cfg.license or notes.pop("license", "")
    inputs = {f"source-{i}": p for i, p in enumerate(sources)}
    with building(out, kind="checkpoint", command="import", config={**to_dict(cfg), "format": fmt,
                  "license": license}, inputs=inputs, force=force) as art:  # fmt: skip
        for i, p in enumerate(sources):
            art.inputs[f"source-{i}"]["sha256"] = sha256_file(p)
        try:
            save_checkpoint(art.dir, model, tok_files)
        except ValueError as e:
            raise UsageError(str(e)) from None
        tok = load_tokenizer(art.dir / "tokenizer.json")
        check_fits(tok, model.config.vocab_size, str(paths[-1]))
        specials = load_specials(art.dir / "tokenizer.json")
        _check_config_ids(notes.pop("config_ids", {}), specials)
        cfg_m = model.config
        # a transformer's layout is its pos/norm/mlp; a model type without them (RWKV) is named
        parts = [getattr(cfg_m, k, None) for k in ("pos", "norm", "mlp")]
        layout = "/".join(parts) if all(parts) else model_type_of(model).name
        art.stats.update(
            {
                "format": fmt,
                "license": license,
                "params": model.num_params(non_embedding=False),
                "layout": layout,
                "n_layer": cfg_m.n_layer,
                "d_model": cfg_m.d_model,
                "n_head": getattr(cfg_m, "n_head", None),
                "n_kv_head": getattr(cfg_m, "n_kv_head", None),
                "vocab_size": cfg_m.vocab_size,
                "max_seq_len": cfg_m.max_seq_len,
                "tied_embeddings": cfg_m.tie_embeddings,
                "dtype": str(model.tok_emb.weight.dtype).removeprefix("torch."),
                "bos_id": specials.bos,
                "eos_id": specials.eos,
                "pad_id": specials.pad,
                **notes,
            }
        )
    s = art.stats
    read = sum(m.get("bytes", 0) for m in art.inputs.values())
    heads = f"{s['n_head']} heads ({s['n_kv_head']} kv), " if s["n_head"] else ""
    arch = (f"{s['n_layer']} layers × {s['d_model']}, {heads}"
            f"{s['layout']}, context {s['max_seq_len']}")  # fmt: skip
    summary(
        f"import {fmt} → {out}",
        [
            ("source", ", ".join(str(p) for p in paths)),
            ("read", human_bytes(read)),
            ("params", f"{s['params'] / 1e6:.2f}M ({s['dtype']})"),
            ("architecture", arch),
            (
                "vocabulary",
                f"{s['vocab_size']:,} (bos {s['bos_id']}, eos {s['eos_id']}, pad {s['pad_id']})",
            ),
            ("license", s["license"] or "unknown (give --license)"),
        ],
    )
    return s


def _llama2c(paths: list[Path]) -> tuple[Any, dict[str, bytes], list[Path], dict[str, Any]]:
    from llmctl.model import llama2c

    if len(paths) != 2:
        raise UsageError("llama2c import takes two files: MODEL.bin TOKENIZER.bin")
    try:
        header = llama2c.read_header(paths[0])
        model = llama2c.read_model(paths[0])
        files = llama2c.tokenizer_files(paths[1], header.vocab_size, header.seq_len)
    except ValueError as e:
        raise UsageError(str(e)) from None
    info(f"llama2c: version {header.version} export, {header.n_layers} layers × {header.dim}")
    return model, files, paths, {"llama2c_version": header.version}


def _hf(paths: list[Path]) -> tuple[Any, dict[str, Any], list[Path], dict[str, Any]]:
    from llmctl.model.hf import INDEX_FILE, read_hf, weight_files
    from llmctl.tokenizer import minimal_tokenizer_config, with_hf_post_processor

    if len(paths) != 1 or not paths[0].is_dir():
        raise UsageError("hf import takes one transformers model folder")
    dir = paths[0]
    try:
        weights = weight_files(dir)
        model = read_hf(dir)
    except ValueError as e:
        raise UsageError(str(e)) from None
    raw = json.loads((dir / "config.json").read_text(encoding="utf-8"))
    if not (dir / "tokenizer.json").is_file():
        raise UsageError(
            f"{dir}: no tokenizer.json (a slow-tokenizer folder: save it once with "
            "transformers' AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR) to add one)"
        )
    files: dict[str, Any] = {"tokenizer.json": dir / "tokenizer.json"}
    tc = dir / "tokenizer_config.json"
    if tc.is_file():
        files["tokenizer_config.json"] = tc
        built = with_hf_post_processor(dir / "tokenizer.json", tc)
        if built is not None:
            files["tokenizer.json"] = built
    else:
        warn(f"{dir}: no tokenizer_config.json; special tokens come from config.json's ids")
        files["tokenizer_config.json"] = minimal_tokenizer_config(dir, raw)
    for extra in ("special_tokens_map.json", "generation_config.json"):
        if (dir / extra).is_file():
            files[extra] = dir / extra
    sources = [dir / "config.json", *weights]
    if (dir / INDEX_FILE).is_file() and len(weights) > 1:
        sources.append(dir / INDEX_FILE)
    sources += [dir / name for name in files if (dir / name).is_file()]
    notes: dict[str, Any] = {
        "hf_model_type": raw.get("model_type"),
        "config_ids": {k: raw.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    }
    license = _card_license(dir / "README.md")
    if license:
        notes["license"] = license
        sources.append(dir / "README.md")
    return model, files, sources, notes


def _card_license(card: Path) -> str:
    """The `license:` of a model card's YAML front matter, if any."""
    if not card.is_file():
        return ""
    text = card.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"---\s*\n(.*?)\n---", text, re.S)
    found = re.search(r"^license:\s*['\"]?([\w.+-]+)", m.group(1), re.M) if m else None
    return found.group(1) if found else ""


def _check_config_ids(config_ids: dict[str, Any], specials: Any) -> None:
    ours = {
        "bos_token_id": specials.bos,
        "eos_token_id": specials.eos,
        "pad_token_id": specials.pad,
    }
    for key, given in config_ids.items():
        given = given[0] if isinstance(given, list) and given else given
        if isinstance(given, int) and ours[key] is not None and given != ours[key]:
            warn(f"config.json {key}={given} but the tokenizer files say {ours[key]}; "
                 "the tokenizer files win")  # fmt: skip
