"""Prompts for online RL and RLAIF: JSONL records in, token ids ready to complete out.

Accepted records (one per line, or a JSON array / object in a `.json` file):
- `{"prompt": str}` (optional `"system": str`), or `{"prompt": [messages]}`;
- `{"messages": [...]}`: the conversation up to its last user turn (trailing assistant turns,
  e.g. an SFT example's answer, are dropped);
- preference pairs, whose prompt is taken: `{"prompt", "chosen", "rejected"}`, KTO's
  `{"prompt", "completion", "label"}`, hh-rlhf's full transcripts `{"chosen", "rejected"}`
  (the shared prefix up to the last `Assistant:`), ShareGPT's `{"conversations": [...], ...}`;
- Alpaca rows `{"instruction", "input"?, ...}`.

A prompt is rendered with the checkpoint's chat template when it has one (`chat="auto"`) and
encoded; one longer than `max_tokens` keeps its last tokens (the end of a prompt is what the
answer continues) and is counted. A malformed record is skipped, counted and kept as a
`BadRecord` for `rejected/errors.jsonl`, or with `strict` stops the run with one line
naming file:line and the key (exit 2).

Example:
    got = load_prompts([Path("prompts.jsonl")], tok, template=chat_template_of(ckpt),
                       max_tokens=200)
    got.ids[0], got.texts[0], got.stats  # {"prompts": 300, "truncated": 2, "rejected": {...}}
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.data.chats import iter_records
from llmctl.data.docs import EXCERPT_CHARS, BadRecord
from llmctl.errors import UsageError
from llmctl.files import display

Prompt = str | list[dict[str, str]]
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}  # fmt: skip


@dataclass
class Prompts:
    """What `load_prompts` read: per prompt its source (`where`), the record's prompt (text or
    messages), the text the model sees (rendered) and its token ids."""

    where: list[str] = field(default_factory=list)
    prompts: list[Prompt] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    ids: list[list[int]] = field(default_factory=list)
    rejected: list[BadRecord] = field(default_factory=list)
    truncated: int = 0

    @property
    def stats(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for bad in self.rejected:
            reasons[bad.reason] = reasons.get(bad.reason, 0) + 1
        return {"prompts": len(self.ids), "truncated": self.truncated, "rejected": reasons}


def _messages(value: Any, key: str) -> list[dict[str, str]] | str:
    """Chat messages checked, or the reason they are not usable."""
    if not isinstance(value, list) or not value:
        return f"{key} must be a non-empty list of messages"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return f"{key}[{i}] is not an object"
        role = m.get("role", SHAREGPT_ROLES.get(str(m.get("from"))))
        content = m.get("content", m.get("value"))
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            return f"{key}[{i}] needs role system|user|assistant and a string content"
        out.append({"role": role, "content": content})
    while out and out[-1]["role"] == "assistant":
        out.pop()  # the answer of an SFT or preference record: the policy writes its own
    if not any(m["role"] == "user" for m in out):
        return f"{key} has no user message"
    return out


def _transcript_prompt(chosen: str, rejected: str) -> str | None:
    """hh-rlhf: the shared beginning of two transcripts, up to and including the last
    'Assistant:' before they differ (None when they share none)."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    head = chosen[:n]
    cut = head.rfind("Assistant:")
    return head[: cut + len("Assistant:")] if cut >= 0 else None


def prompt_of(rec: Any) -> tuple[Prompt, str] | tuple[None, str]:
    """(the prompt of a record, "") or (None, "key: why") for an unusable record."""
    if not isinstance(rec, dict):
        return None, "record: expected a JSON object"
    if "prompt" in rec:
        p = rec["prompt"]
        if isinstance(p, str):
            if not p.strip():
                return None, "prompt: empty"
            system = rec.get("system")
            if isinstance(system, str) and system:
                return [{"role": "system", "content": system}, {"role": "user", "content": p}], ""
            return p, ""
        msgs = _messages(p, "prompt")
        return (msgs, "") if isinstance(msgs, list) else (None, msgs)
    for key in ("messages", "conversations"):
        if key in rec:
            msgs = _messages(rec[key], key)
            return (msgs, "") if isinstance(msgs, list) else (None, msgs)
    if "instruction" in rec:
        ins, inp = rec["instruction"], rec.get("input") or ""
        if not isinstance(ins, str) or not isinstance(inp, str) or not ins.strip():
            return None, "instruction: expected a non-empty string"
        return (ins if not inp else f"{ins}\n\n{inp}"), ""
    if isinstance(rec.get("chosen"), str) and isinstance(rec.get("rejected"), str):
        head = _transcript_prompt(rec["chosen"], rec["rejected"])
        return (head, "") if head else (None, "chosen/rejected: no shared prompt")
    return None, 'prompt: missing (expected {"prompt": ...} or {"messages": [...]})'


def render(prompt: Prompt, tok: Any, template: str | None, chat: bool) -> tuple[str, list[int]]:
    """(the text the model sees, its ids): through the chat template when `chat` (or when the
    prompt is a message list), else the plain text with the tokenizer's own special tokens."""
    from llmctl.tokenizer import encode, encode_prompt, render_chat

    if isinstance(prompt, list) or chat:
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        text = render_chat(msgs, add_generation_prompt=True, template=template)
        return text, encode(tok, text)
    return prompt, encode_prompt(tok, prompt)


def load_prompts(
    files: Sequence[Path],
    tok: Any,
    *,
    template: str | None,
    chat: bool | None = None,
    max_tokens: int,
    strict: bool = False,
    max_line_bytes: int = 16 * 1024 * 1024,
) -> Prompts:
    """Read, render and encode every prompt of `files` (see the module doc). `chat=None`
    renders through `template` when there is one. UsageError: a missing file, no usable
    prompt, or (with `strict`) the first bad record, as file:line: key: why."""
    use_chat = template is not None if chat is None else chat
    got = Prompts()
    for path in files:
        if not Path(path).is_file():
            raise UsageError(f"{path}: prompts file not found")
        for item in iter_records(Path(path), max_line_bytes):
            if isinstance(item, BadRecord):
                if strict:
                    raise UsageError(item.message())
                got.rejected.append(item)
                continue
            line, rec = item
            prompt, why = prompt_of(rec)
            if prompt is None:
                if strict:
                    raise UsageError(f"{path}:{line}: {why}")
                excerpt = json.dumps(rec, ensure_ascii=False)[:EXCERPT_CHARS]
                got.rejected.append(BadRecord(str(path), line, "bad_prompt", f"{why}: {excerpt}"))
                continue
            text, ids = render(prompt, tok, template, use_chat)
            if len(ids) > max_tokens:
                ids = ids[-max_tokens:]
                got.truncated += 1
            got.where.append(f"{path}:{line}")
            got.prompts.append(prompt)
            got.texts.append(text)
            got.ids.append(ids)
    if not got.ids:
        why = f" ({got.stats['rejected']})" if got.rejected else ""
        raise UsageError(f"{', '.join(map(str, files))}: no usable prompt{why}")
    return got


def read_prompt_file(path: Path) -> list[tuple[str, str | list[dict[str, str]]]]:
    """(`file:line`, prompt text or chat messages) per non-blank line of a JSONL file of
    `{"prompt": str}` or `{"messages": [...]}` records (generate --prompts, distill's
    prompts); any other line is a one-line error naming it."""
    from llmctl.data.docs import open_input

    if not path.exists():
        raise UsageError(f"{display(path)}: prompts file not found")
    out: list[tuple[str, Any]] = []
    with io.TextIOWrapper(open_input(path), encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, start=1):
                where = f"{display(path)}:{n}"
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{where}: not valid JSON ({e.msg})") from None
                except (RecursionError, ValueError) as e:  # absurd nesting, 4300+ digit ints
                    raise UsageError(f"{where}: not usable JSON ({type(e).__name__})") from None
                if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
                    out.append((where, rec["prompt"]))
                elif isinstance(rec, dict) and isinstance(rec.get("messages"), list):
                    out.append((where, rec["messages"]))
                else:
                    raise UsageError(
                        f'{where}: expected {{"prompt": str}} or {{"messages": [...]}}'
                    )
        except UnicodeDecodeError:
            raise UsageError(f"{display(path)}: not valid UTF-8") from None
    if not out:
        raise UsageError(f"{display(path)}: no prompts (the file is empty)")
    return out
