"""`llmctl export`: write a checkpoint in a format other tools run; an `export` artifact.

Formats (written by llmctl itself; transformers and llama.cpp are not needed):
- `hf`: a transformers folder — `model.safetensors`, `config.json` (GPT-2 or Llama, chosen
  from the checkpoint's architecture; `RwkvForCausalLM` for an RWKV-4 checkpoint),
  `generation_config.json`, the tokenizer files, and a model card `README.md` with the license
  and sources found in the checkpoint's lineage.
  `AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` load it.
- `gguf`: one `model.gguf` for llama.cpp / Ollama (`--set gguf.type=q8_0`; f16 by default),
  with `general.license` and `general.sources`. GPT checkpoints only: llama.cpp runs RWKV-6/7,
  not the RWKV-4 llmctl trains, so an RWKV checkpoint is refused in one line.

Any checkpoint whose architecture one of these layouts computes exports the same way
(pretrained, imported, finetuned, merged); anything else is a one-line error.

Example:
    llmctl export out/ckpt --format hf --out out/ckpt-hf
    llmctl export out/ckpt --format gguf --set gguf.type=q8_0 --out out/ckpt-gguf
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from llmctl.artifacts import building, is_artifact, open_artifact
from llmctl.config import helpful, nested, to_dict
from llmctl.errors import UsageError
from llmctl.runtime import human_bytes, summary, warn

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class GGUFConfig:
    """GGUF settings."""

    type: Literal["f32", "f16", "bf16", "q8_0", "q4_0"] = helpful(
        "f16", "weight type of matrices (norms and biases stay f32)"
    )


@dataclass(frozen=True)
class ExportConfig:
    """Settings of `llmctl export`."""

    format: Literal["hf", "gguf"] = helpful("hf", "hf (transformers folder) or gguf (llama.cpp)")
    name: str = helpful("", "model name written into the export (default: the output's name)")
    license: str = helpful("", "license to declare (default: the one found in the lineage)")
    gguf: GGUFConfig = nested(GGUFConfig, "GGUF options")


def lineage(path: Path, depth: int = 0) -> tuple[list[str], list[str]]:
    """(licenses, sources) recorded in an artifact's manifest and, recursively, its inputs':
    licenses from `import` configs, sources as `path (sha256 …)` of the files it was made from."""
    if depth > 32 or not is_artifact(path):
        return [], []
    m = open_artifact(path, tuple(_kinds()), verify=False)
    licenses = [m.config["license"]] if m.config.get("license") else []
    sources: list[str] = []
    for ref in m.data.get("inputs", {}).values():
        p = Path(ref.get("path", ""))
        if ref.get("kind") == "file":
            sha = ref.get("sha256")
            sources.append(f"{p.name} (sha256 {sha})" if sha else str(p))
        else:
            more_l, more_s = lineage(p, depth + 1)
            licenses += more_l
            sources += more_s
    return list(dict.fromkeys(licenses)), list(dict.fromkeys(sources))


def _kinds() -> tuple[str, ...]:
    from llmctl.artifacts import KINDS

    return KINDS


def run(checkpoint: Path, out: Path, cfg: ExportConfig, force: bool = False) -> dict[str, Any]:
    """Export `checkpoint` to `out` in `cfg.format`; returns the manifest stats."""
    from llmctl.model.io import load_model
    from llmctl.tokenizer import load_specials

    ckpt = open_artifact(checkpoint, "checkpoint")
    model = load_model(checkpoint)
    from llmctl.model.hf import GGUF_LAYOUTS, hf_layout
    from llmctl.model.io import build_model

    quantized = getattr(model, "quantization", None)
    if quantized is not None:
        # neither layout stores our integer blocks: export the dequantized weights (GGUF's
        # q8_0/q4_0, symmetric blocks of 32 with fp16 scales, are requantized from them)
        from llmctl.model.quant import dequantize_model

        dequantize_model(model)
        warn(
            f"{checkpoint} is quantized ({quantized['method']}): exporting its dequantized "
            f"weights{', requantized to ' + cfg.gguf.type if cfg.format == 'gguf' else ''}"
        )

    with torch.device("meta"):
        plain = set(build_model(model.config).state_dict())
    if set(model.state_dict()) != plain:
        # swapped layers (quantized, LoRA) hold tensors no transformers/GGUF layout names
        raise UsageError(
            f"{checkpoint}: has swapped layers (quantization or adapters); export the "
            "checkpoint they were made from, or merge/dequantize them first"
        )

    try:
        layout = hf_layout(model.config)
    except ValueError as e:
        raise UsageError(f"{checkpoint}: {e}") from None
    if cfg.format == "gguf" and layout not in GGUF_LAYOUTS:
        raise UsageError(
            f"{checkpoint}: an RWKV-4 model; llama.cpp has no RWKV-4 architecture (only "
            "RWKV-6/7), so there is no GGUF to write: export --format hf instead"
        )
    for name in TOKENIZER_FILES:
        if not (checkpoint / name).is_file():
            raise UsageError(
                f"{checkpoint}: no {name}; cannot export a model without its tokenizer"
            )
    specials = load_specials(checkpoint)
    licenses, sources = lineage(checkpoint)
    license = cfg.license or (licenses[0] if len(licenses) == 1 else " AND ".join(licenses))
    name = cfg.name or out.name
    with building(out, kind="export", command="export", config=to_dict(cfg),
                  inputs={"checkpoint": checkpoint}, force=force) as art:  # fmt: skip
        if cfg.format == "hf":
            from llmctl.model.hf import save_hf

            ids = {"bos_token_id": specials.bos, "eos_token_id": specials.eos,
                   "pad_token_id": specials.pad}  # fmt: skip
            save_hf(model, art.dir, ids)
            for f in TOKENIZER_FILES:
                shutil.copyfile(checkpoint / f, art.dir / f)
            (art.dir / "README.md").write_text(
                model_card(name, layout, model, license, sources, ckpt.digest), encoding="utf-8"
            )
            extra: dict[str, Any] = {}
        else:
            from llmctl.model.gguf import write_gguf

            try:
                extra = write_gguf(model, checkpoint, art.dir / "model.gguf", cfg.gguf.type,
                                   name=name, license=license, sources=sources)  # fmt: skip
            except ValueError as e:
                raise UsageError(str(e)) from None
        total = sum(p.stat().st_size for p in art.dir.iterdir() if p.is_file())
        art.stats.update(
            {
                "format": cfg.format,
                "layout": layout,
                "type": cfg.gguf.type if cfg.format == "gguf" else _dtype(model),
                "license": license,
                "sources": sources,
                "params": model.num_params(non_embedding=False),
                "bytes": total,
                "dequantized_from": None if quantized is None else quantized["method"],
                **extra,
            }
        )
    s = art.stats
    rows = [
        ("checkpoint", str(checkpoint)),
        ("format", f"{cfg.format} ({layout} layout, {s['type']})"),
        ("params", f"{s['params'] / 1e6:.2f}M"),
        ("size", human_bytes(s["bytes"])),
        ("license", license or "unknown (give --set license=...)"),
    ]
    if "tensor_types" in s:
        rows.append(("tensor types", json.dumps(s["tensor_types"])))
    summary(f"export → {out}", rows)
    return s


def _dtype(model: Any) -> str:
    return str(model.tok_emb.weight.dtype).removeprefix("torch.")


def model_card(name: str, layout: str, model: Any, license: str, sources: list[str],
               digest: str) -> str:  # fmt: skip
    """A transformers model card: YAML front matter (license, library) and what it is."""
    from llmctl import __version__

    cfg = model.config
    if layout == "rwkv":
        what = (f"an RWKV-4 (RwkvForCausalLM) causal LM: "
                f"{model.num_params(non_embedding=False) / 1e6:.2f}M parameters, {cfg.n_layer} "
                f"layers, d_model {cfg.d_model}, d_ff {cfg.d_ff}, trained at context "
                f"{cfg.max_seq_len} (a recurrent model: none is enforced), vocabulary "
                f"{cfg.vocab_size}.")  # fmt: skip
    else:
        what = (f"a {'GPT-2' if layout == 'gpt2' else 'Llama'}-layout causal LM: "
                f"{model.num_params(non_embedding=False) / 1e6:.2f}M parameters, {cfg.n_layer} "
                f"layers, d_model {cfg.d_model}, {cfg.n_head} heads ({cfg.n_kv_head} kv), "
                f"context {cfg.max_seq_len}, vocabulary {cfg.vocab_size}.")  # fmt: skip
    front = ["---", "library_name: transformers", "tags:", "- llmctl", "- text-generation"]
    if license:
        front.insert(1, f"license: {license.lower() if ' ' not in license else 'other'}")
    front.append("---")
    lines = [
        *front,
        "",
        f"# {name}",
        "",
        f"Exported by llmctl {__version__} from checkpoint digest `{digest}` as {what}",
        "",
        f"License: {license or 'unknown (none recorded in the lineage)'}.",
        "",
        "## Sources",
        "",
        *([f"- {s}" for s in sources] or ["- (none recorded)"]),
        "",
    ]
    return "\n".join(lines)
