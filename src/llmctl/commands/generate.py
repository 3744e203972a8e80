"""`llmctl generate`: complete prompts with a checkpoint (every strategy of `model/sample.py`).

Reads a `checkpoint` (optionally an `adapter` merged into it and a `--draft` checkpoint with
the same tokenizer); prompts come from `--prompt TEXT` or `--prompts FILE.jsonl` (one
`{"prompt": "..."}` or `{"messages": [...]}` per line). Completions go to stdout (streamed
token by token on a terminal); `--out DIR` writes a `samples` artifact (`samples.jsonl`).
Plain prompts get the tokenizer's own special tokens (`tokenizer.encode_prompt`: for llmctl
tokenizers <|eos|>, the document separator of the shards, so a prompt starts a fresh document
as in pretraining; BOS for most imported models), exactly as transformers builds them.
`--chat` renders prompts with the chat template and, with no prompt on a terminal, opens an
interactive chat (`/reset`, `/exit`).
A masked-LM checkpoint fills the <|mask|> tokens of each prompt instead.

Example:
    llmctl generate out/ckpt --prompt "Once upon a time" --do-sample --top-p 0.9 --seed 0
    llmctl generate out/ckpt --prompts prompts.jsonl --num-beams 4 --out out/samples
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmctl.artifacts import building, is_artifact, open_artifact
from llmctl.config import helpful, to_dict
from llmctl.data.prompts import read_prompt_file
from llmctl.errors import UsageError
from llmctl.model.sample import GenerationParams, Stops, decode_dtype
from llmctl.runtime import info, summary, warn

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class GenerateConfig(GenerationParams):
    """Settings of `llmctl generate`: transformers' `generate` parameters plus these."""

    prompt: str | None = helpful(
        None, 'Prompt text (or use `prompts`); "" starts from the tokenizer\'s own specials (BOS).'
    )
    prompts: str = helpful("", "JSONL file: one {'prompt': ...} or {'messages': [...]} a line.")
    adapter: str = helpful("", "LoRA adapter (PEFT layout) to merge into the checkpoint first.")
    draft: str = helpful("", "Draft checkpoint for speculative decoding (same tokenizer).")
    chat: bool = helpful(False, "Render prompts with the checkpoint's chat template.")
    strict: bool = helpful(False, "A prompt longer than the context is an error, not truncated.")
    batch_size: int = helpful(8, "Prompts decoded together (left-padded) when not streaming.")
    device: str = helpful("auto", "cpu, cuda, cuda:N or auto (cuda when available).")
    dtype: str = helpful(
        "auto",
        f"One of {', '.join(DTYPES)} (auto: bfloat16 on CUDA and on CPUs with native bf16 "
        "matmuls, else the checkpoint's).",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}")
        if self.prompt is not None and self.prompts:
            raise ValueError("give prompt or prompts, not both")

    def params(self, seed: int | None) -> GenerationParams:
        """The decoding settings alone, with the seed actually used."""
        names = [f.name for f in dataclasses.fields(GenerationParams)]
        return GenerationParams(**{**{n: getattr(self, n) for n in names}, "seed": seed})


def _load(cfg: GenerateConfig, checkpoint: Path) -> tuple[Any, Any, Any, Any]:
    """(model, tokenizer, checkpoint manifest, draft model or None)."""
    from llmctl.model.adapter import merge_adapter
    from llmctl.model.io import load_model
    from llmctl.tokenizer import check_fits, load_tokenizer

    ckpt = open_artifact(checkpoint, "checkpoint")
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = decode_dtype(cfg.dtype, device)
    try:
        # Load in the checkpoint's dtype, merge any adapter there, then cast: a LoRA delta
        # added in bf16 would lose most of its bits.
        model, draft = load_model(checkpoint, device), None
        if getattr(model.config, "head", "lm") == "score":
            raise UsageError(
                f"{checkpoint}: a reward model (head = score) scores text and cannot generate; "
                f"score pairs with `llmctl eval {checkpoint} PAIRS`"
            )
        if cfg.adapter:
            adapter = Path(cfg.adapter)
            if is_artifact(adapter):
                open_artifact(adapter, "adapter")
            if getattr(model, "quantization", None) is not None:
                # a quantized base stays quantized: the adapter runs beside it (QLoRA)
                from llmctl.model.adapter import load_adapter

                live = load_adapter(model, adapter, base_digest=ckpt.digest)
                info(f"adapter {adapter} on {len(live)} quantized layers (not merged)")
            else:
                merged = merge_adapter(model, adapter, base_digest=ckpt.digest)
                info(f"merged adapter {adapter} into {len(merged)} linear layers")
        if cfg.draft:
            dm = open_artifact(cfg.draft, "checkpoint")
            sha = [m.files.get("tokenizer.json", {}).get("sha256") for m in (ckpt, dm)]
            if sha[0] != sha[1]:
                raise UsageError(
                    f"{cfg.draft}: the draft's tokenizer.json differs from the model's"
                )
            draft = load_model(cfg.draft, device, dtype)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if draft is not None:
        for m, where in ((model, checkpoint), (draft, cfg.draft)):
            if not getattr(m, "can_rollback", True):
                raise UsageError(
                    f"{where}: --draft needs a cache that can roll back; "
                    f"{type(m).__name__}'s recurrent state cannot (generate without --draft)"
                )
    if dtype is not None:
        model.to(dtype)
    tok = load_tokenizer(checkpoint)
    check_fits(tok, model.config.vocab_size, str(checkpoint))
    return model, tok, ckpt, draft


def _check_masked_lm(cfg: GenerateConfig) -> None:
    defaults = GenerateConfig()
    wrong = [
        name
        for name in ("num_beams", "draft", "stop", "stop_token_ids", "repetition_penalty",
                     "frequency_penalty", "presence_penalty", "no_repeat_ngram_size", "chat")
        if getattr(cfg, name) != getattr(defaults, name)
    ]  # fmt: skip
    if wrong:
        raise UsageError(
            f"this is a masked-LM checkpoint (it fills <|mask|> tokens); "
            f"{', '.join(wrong)} do not apply to it"
        )


def run(checkpoint: Path, cfg: GenerateConfig, out: Path | None = None, force: bool = False,
        write: Callable[[str], None] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Generate for every prompt; print completions (stream them on a TTY); with `out`, write
    a `samples` artifact. Returns the sample records."""

    from llmctl.model import sample
    from llmctl.tokenizer import (
        chat_template_of,
        decode,
        encode,
        encode_prompt,
        load_specials,
        render_chat,
    )

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    given = cfg.prompt is not None or bool(cfg.prompts)
    repl = not given and cfg.chat and interactive
    if not given and not repl:
        raise UsageError("give --prompt TEXT or --prompts FILE.jsonl (or --chat on a terminal)")
    items = read_prompt_file(Path(cfg.prompts)) if cfg.prompts else [("--prompt", cfg.prompt)]
    started = time.time()  # the samples manifest's duration_s: loading included
    model, tok, ckpt, draft = _load(cfg, checkpoint)
    specials = load_specials(checkpoint)
    pad_id = specials.pad_or_eos
    template = chat_template_of(checkpoint)  # the one finetune trained with; None: llmctl's
    write = write or (lambda s: (sys.stdout.write(s), sys.stdout.flush()))
    mlm = not model.config.causal
    if mlm:
        _check_masked_lm(cfg)
    limit = model.config.max_seq_len - (0 if mlm else cfg.max_new_tokens)
    if limit < 1:
        raise UsageError(
            f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the model's "
            f"context of {model.config.max_seq_len} tokens"
        )
    seed = cfg.seed if cfg.seed is not None or not cfg.do_sample else secrets.randbelow(2**31)
    params = cfg.params(seed)
    settings = to_dict(params)
    stops = Stops(
        cfg.max_new_tokens,
        eos_ids=frozenset({specials.eos}),
        stop_ids=frozenset(cfg.stop_token_ids)
        | (frozenset({specials.end_of_turn}) if cfg.chat else frozenset()),
        strings=tuple(cfg.stop),
        decode=lambda ids: decode(tok, ids),
    )

    def tokens_of(where: str, value: str | list[dict[str, str]]) -> list[int]:
        if isinstance(value, list) or cfg.chat:
            msgs = value if isinstance(value, list) else [{"role": "user", "content": value}]
            ids = encode(tok, render_chat(msgs, add_generation_prompt=True, template=template))
        else:
            ids = encode_prompt(tok, value)
        if len(ids) > limit:
            why = f"{where}: prompt has {len(ids)} tokens; the context leaves room for {limit}"
            if cfg.strict:
                raise UsageError(why)
            warn(f"{why}; keeping its last {limit} tokens")
            ids = ids[-limit:]
        return ids

    if repl:
        return chat_repl(model, tok, params, stops, draft, tokens_of, write, pad_id=pad_id)
    encoded = [tokens_of(where, value) for where, value in items]

    streaming = interactive and cfg.num_beams == 1 and not mlm
    records, t0 = [], time.perf_counter()
    for start in range(0, len(items), 1 if streaming or mlm else cfg.batch_size):
        batch = encoded[start : start + (1 if streaming or mlm else cfg.batch_size)]
        if mlm:
            if specials.mask is None or specials.mask not in batch[0]:
                raise UsageError(f"{items[start][0]}: the prompt has no <|mask|> token to fill")
            results = [[]]
            for s in range(cfg.num_samples):
                gen = sample.row_generator(seed or 0, start, s, model.tok_emb.weight.device)
                filled = sample.fill_masks(model, batch[0], specials.mask, params, generator=gen,
                                           banned_ids=sorted(specials.all))  # fmt: skip
                text = decode(tok, filled[1:] if filled[0] in specials.all else filled)
                fills = [t for t, m in zip(filled, batch[0], strict=True) if m == specials.mask]
                results[0].append(sample.Completion(fills, text, finish_reason="filled"))
        elif streaming:
            results = [[]]
            for s in range(cfg.num_samples):
                _header(len(items), cfg.num_samples, start, s)
                for delta in sample.stream(model, batch[0], params, stops=stops, draft=draft,
                                           pad_id=pad_id, index=start, sample=s,
                                           decode_layout=True):  # fmt: skip
                    write(delta.text)
                write("\n")
                results[0].append(delta.completion)
        else:
            results = sample.generate(model, batch, params, stops=stops, draft=draft,
                                      pad_id=pad_id, first_index=start,
                                      decode_layout=True)  # fmt: skip
        for i, comps in enumerate(results):
            for s, c in enumerate(comps):
                if not streaming:
                    _header(len(items), len(comps), start + i, s)
                    write(c.text + "\n")
                rec = {
                    "index": start + i,
                    "sample": s,
                    "prompt": items[start + i][1],
                    "completion": c.text,
                    "finish_reason": c.finish_reason,
                    "prompt_tokens": len(batch[i]),
                    "completion_tokens": len(c.tokens),
                }
                if c.score is not None:
                    rec["score"] = c.score
                records.append({**rec, "settings": settings})
    seconds = time.perf_counter() - t0
    _finish(records, seconds, cfg, checkpoint, ckpt, out, force, started)
    return records


def _header(n_prompts: int, n_samples: int, index: int, s: int) -> None:
    if n_prompts > 1 or n_samples > 1:
        info(f"[dim]── prompt {index + 1}/{n_prompts} · sample {s + 1}/{n_samples} ──[/]")


def _finish(records: list[dict[str, Any]], seconds: float, cfg: GenerateConfig, checkpoint: Path,
            ckpt: Any, out: Path | None, force: bool, started: float) -> None:  # fmt: skip
    new_tokens = sum(r["completion_tokens"] for r in records)
    reasons = Counter(r["finish_reason"] for r in records)
    stats = {
        "prompts": len({r["index"] for r in records}),
        "samples": len(records),
        "prompt_tokens": sum({r["index"]: r["prompt_tokens"] for r in records}.values()),
        "completion_tokens": new_tokens,
        "finish_reasons": dict(sorted(reasons.items())),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(new_tokens / max(seconds, 1e-9), 1),
    }
    if out is not None:
        inputs = {"checkpoint": checkpoint}
        inputs |= {"adapter": Path(cfg.adapter)} if cfg.adapter else {}
        inputs |= {"draft": Path(cfg.draft)} if cfg.draft else {}
        with building(out, kind="samples", command="generate", config=to_dict(cfg),
                      inputs=inputs, force=force, started=started) as art:  # fmt: skip
            with open(art.dir / "samples.jsonl", "w", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            art.stats.update(stats)
    rows = [(k, v) for k, v in stats.items() if k != "finish_reasons"]
    rows += [(f"finish: {k}", v) for k, v in stats["finish_reasons"].items()]
    summary(f"generate {ckpt.path}", rows + ([("out", str(out))] if out else []))


def chat_repl(model: Any, tok: Any, params: GenerationParams, stops: Stops, draft: Any,
              tokens_of: Callable[[str, Any], list[int]], write: Callable[[str], None],
              read: Callable[[str], str] = input, pad_id: int = 0
              ) -> list[dict[str, Any]]:  # fmt: skip
    """Interactive chat that keeps the conversation; `/reset` forgets it, `/exit` (or EOF)
    ends. Returns the conversation's records (one per assistant turn)."""
    from llmctl.model.sample import stream

    info("chat: /reset starts over, /exit (or Ctrl-D) leaves")
    messages: list[dict[str, str]] = []
    records: list[dict[str, Any]] = []
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("\n")
            break
        if line == "/exit":
            break
        if line == "/reset":
            messages = []
            info("(conversation reset)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = tokens_of(f"turn {len(records) + 1}", list(messages))
        write("assistant> ")
        for delta in stream(model, ids, params, stops=stops, draft=draft, pad_id=pad_id,
                            index=len(records), decode_layout=True):  # fmt: skip
            write(delta.text)
        write("\n")
        c = delta.completion
        messages.append({"role": "assistant", "content": c.text})
        records.append({"messages": list(messages), "finish_reason": c.finish_reason})
    return records
