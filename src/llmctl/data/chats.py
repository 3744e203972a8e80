"""Instruction data: chat files in, token rows with an assistant-only loss mask out.

Used by `finetune` and `lora`. Reading: `.json` (an array, one object, or JSON lines),
`.json.gz`, `.jsonl`, `.jsonl.gz`, `.jsonl.zst`, `.ndjson`, files or folders of them. Each
file's shape is detected from its first record that has one (a file where none has is a
one-line error naming it):

- `messages`: `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
- `prompt_response`: `{"prompt", "response"}`;  `prompt_completion`: `{"prompt", "completion"}`
- `alpaca`: `{"instruction", "input" (optional), "output"}` (prompt = instruction + blank
  line + input); the flat shapes take an optional `"system"` string.

A record that does not fit its file's shape (missing key, wrong type, no assistant turn, a
special-token string inside the text, bad JSON) is a `BadRecord`: skipped, counted, kept in
`rejected/errors.jsonl` by the command; `strict` stops at the first.

Rendering (`encode_chat`) uses the checkpoint's chat template (the same Jinja template
`generate --chat` and transformers use). The rendered text is encoded once; the loss mask comes
from the character spans of the assistant turns, found by rendering each turn's prefix (with
the generation prompt) and the prefix through that turn, so ids are exactly those of encoding
the whole text. An assistant span runs to its last end-of-turn token, which is in the mask;
the first token of an example is never a target (in a packed row it would be predicted from
the previous example).

Truncation to a context of `ctx` tokens (`truncate`): the prompt (everything before the last
assistant turn) is cut from the left so that min(answer length, ctx // 2) answer tokens fit,
then the answer is cut at `ctx`.

Rows (`ChatRows`): examples are shuffled per epoch by (seed, epoch) and packed next-fit into
rows of `row_len` tokens (positions restart and attention is blocked at every example
boundary: `position_ids` and `segment_ids`), or one example per padded row. The plan depends
only on the seed, so `sample(i)` is a pure function of i (exact resume).

Example:
    sets = prepare_chats(ckpt, [Path("sft.jsonl")], ChatDataConfig(), tok=tok,
                         specials=load_specials(ckpt), seq_len=64, batch_size=8, seed=0)
    batch = sets.train.sample(0)  # {"tokens", "loss_mask", "position_ids", "segment_ids"}
    # or piece by piece:
    data = load_chats([Path("sft.jsonl")], tok, template=None, end_id=end, ctx=65,
                      opts=ChatDataConfig())
    train, val = split_examples(data.examples, 0.05)
    rows = ChatRows(train, row_len=65, batch_size=8, pack=True, seed=0, pad_id=pad)
    batch = rows.sample(0)   # {"tokens", "loss_mask", "position_ids", "segment_ids"}: [8, 65]
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmctl.config import helpful
from llmctl.data.docs import (
    EXCERPT_CHARS,
    BadRecord,
    Raw,
    ReadOptions,
    iter_raw,
    keep_aside,
    load_json_line,
)
from llmctl.errors import UsageError
from llmctl.files import check_regular, read_bytes

CHAT_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")
SHAPES = ("messages", "prompt_response", "prompt_completion", "alpaca")
SHAPE_KEYS = {
    "messages": "messages",
    "prompt_response": "prompt + response",
    "prompt_completion": "prompt + completion",
    "alpaca": "instruction + input + output",
}
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatDataConfig:
    """How instruction data is read, masked, cut and batched (finetune and lora inherit it)."""

    loss_on: Literal["assistant", "all"] = helpful(
        "assistant", "assistant: loss on assistant tokens only; all: on every token"
    )
    packing: bool = helpful(
        True, "pack several examples per row (attention and positions reset at each boundary)"
    )
    val_fraction: float = helpful(
        0.05, "share of examples held out for validation (by a hash of their text)"
    )
    strict: bool = helpful(False, "fail at the first malformed record instead of skipping it")
    max_line_bytes: int = helpful(16 * 1024 * 1024, "longer JSONL lines are skipped as malformed")

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass(slots=True)
class Example:
    """One tokenized conversation: `ids` and `mask` (1 = a target token), where it came from."""

    ids: np.ndarray  # int64 [L]
    mask: np.ndarray  # int64 [L], 0/1
    where: str


@dataclass
class ChatData:
    """What `load_chats` read: usable examples, the records it rejected, and counts."""

    examples: list[Example]
    rejected: list[BadRecord]
    stats: dict[str, Any] = field(default_factory=dict)


class TemplateError(UsageError):
    """The chat template cannot be used to locate assistant turns."""


# --- reading ---------------------------------------------------------------------------------


def _has_suffix(path: Path, suffixes: Iterable[str]) -> bool:
    return any(path.name.lower().endswith(s) for s in suffixes)


def resolve_chat_files(paths: Iterable[Path | str]) -> list[Path]:
    """Files named, plus the chat files inside named folders (sorted, hidden skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UsageError(f"{p}: no such file or directory")
        if p.is_dir():
            found = sorted(
                f
                for f in p.rglob("*")
                if not f.is_dir()
                and _has_suffix(f, CHAT_SUFFIXES)
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            for f in found:  # a pipe or device named like data is refused, never opened
                check_regular(f)
            if not found:
                raise UsageError(f"{p}: folder holds no {', '.join(CHAT_SUFFIXES)} files")
            out += found
        elif _has_suffix(p, CHAT_SUFFIXES):
            check_regular(p)
            out.append(p)
        else:
            raise UsageError(
                f"{p}: unsupported data file (expected one of {', '.join(CHAT_SUFFIXES)})"
            )
    if not out:
        raise UsageError("no data files given")
    return out


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _iter_json_array(name: str, text: str, start: int) -> Iterator[tuple[int, Any] | BadRecord]:
    """(line, item) of each item of the JSON array at `text[start] == '['`. A syntax error
    ends the file (nothing after it can be located): one BadRecord at its line."""
    dec = json.JSONDecoder()
    i, line, counted = _skip_ws(text, start + 1), 1, 0

    def line_at(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    if i < len(text) and text[i] == "]":
        return
    while True:
        at = line_at(i)
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            yield BadRecord(name, at, "bad_json", f"{e.msg}: {text[i : i + EXCERPT_CHARS]}")
            return
        except (RecursionError, ValueError) as e:
            what = "nested too deeply" if isinstance(e, RecursionError) else "unusable value"
            yield BadRecord(name, at, "bad_json", f"{what}: {text[i : i + EXCERPT_CHARS]}")
            return
        yield at, obj
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if i < len(text) and text[i] == "]" and _skip_ws(text, i + 1) == len(text):
            return
        yield BadRecord(name, line_at(i), "bad_json", f"expected ',' or ']' in the array: "
                        f"{text[i : i + EXCERPT_CHARS]}")  # fmt: skip
        return


def iter_records(path: Path, max_line_bytes: int) -> Iterator[tuple[int, Any] | BadRecord]:
    """(line, parsed JSON value) per record of one chat file, or BadRecords."""
    name = str(path)
    lower = path.name.lower()
    if lower.endswith((".json", ".json.gz")):
        try:
            data = gzip.decompress(read_bytes(path)) if lower.endswith(".gz") else read_bytes(path)
            text = data.decode("utf-8").lstrip("\ufeff")
        except (OSError, EOFError) as e:
            yield BadRecord(name, 0, "truncated_file", f"{type(e).__name__}: {e}"[:EXCERPT_CHARS])
            return
        except UnicodeDecodeError as e:
            yield BadRecord(name, 0, "invalid_utf8", str(e)[:EXCERPT_CHARS])
            return
        start = _skip_ws(text, 0)
        if start == len(text):
            yield BadRecord(name, 0, "empty_file")
            return
        if text[start] == "[":
            yield from _iter_json_array(name, text, start)
            return
        try:  # one object for the whole file ...
            yield 1, json.loads(text)
            return
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":
                yield BadRecord(name, e.lineno, "bad_json", f"{e.msg}: {text[:EXCERPT_CHARS]}")
                return
        except (RecursionError, ValueError):
            yield BadRecord(name, 1, "bad_json", f"unusable JSON: {text[:EXCERPT_CHARS]}")
            return
        # ... or JSON lines in a .json file
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                rec = load_json_line(Raw(name, n, "json", line.encode("utf-8")))
                yield rec if isinstance(rec, BadRecord) else (n, rec)
        return
    opts = ReadOptions(max_line_bytes=max_line_bytes)
    for raw in iter_raw([path], opts):
        if isinstance(raw, BadRecord):
            yield raw
            continue
        rec = load_json_line(raw)
        yield rec if isinstance(rec, BadRecord) else (raw.line, rec)


# --- shapes ----------------------------------------------------------------------------------


def shape_of(rec: Any) -> str | None:
    """The shape whose keys `rec` has (types are checked later), or None."""
    if not isinstance(rec, dict):
        return None
    if "messages" in rec:
        return "messages"
    if "prompt" in rec and "response" in rec:
        return "prompt_response"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    return None


def parse_messages(
    value: Any, key: str = "messages", roles: dict[str, str] | None = None
) -> list[dict[str, str]] | str:
    """`value` as {role, content} messages, or the reason it is not (a short phrase naming
    `key` and the index). With `roles`, messages are ShareGPT's {from, value}, `roles` mapping
    `from` to a role. A system message may only come first.
    Example: parse_messages([{"role": "user", "content": "Hi"}]) -> [{...}]"""
    if not isinstance(value, list):
        return f"{key} must be a list of messages"
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return f"{key}[{i}] is not an object"
        if roles is not None:
            sender, content = m.get("from"), m.get("value")
            role = roles.get(sender) if isinstance(sender, str) else None
            if role is None:
                return f"{key}[{i}].from must be one of {', '.join(roles)}, not {sender!r}"
        else:
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                return f"{key}[{i}].role must be one of {', '.join(ROLES)}, not {role!r}"
        if not isinstance(content, str):
            return f"{key}[{i}].content must be a string"
        if role == "system" and i != 0:
            return f"{key}[{i}]: a system message must come first"
        out.append({"role": role, "content": content})
    return out


def to_messages(rec: dict[str, Any], shape: str) -> list[dict[str, str]] | str:
    """The conversation of a record of `shape`, or the reason it has none (a short phrase)."""
    if shape == "messages":
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "messages must be a non-empty list"
        out = parse_messages(msgs)
        if isinstance(out, str):
            return out
        if not any(m["role"] == "assistant" for m in out):
            return "no assistant message"
        return out
    if shape == "alpaca":
        instruction, inp, output = rec["instruction"], rec.get("input", ""), rec["output"]
        if inp is None:
            inp = ""
        for key, value in (("instruction", instruction), ("input", inp), ("output", output)):
            if not isinstance(value, str):
                return f"{key} must be a string"
        prompt = instruction if not inp else f"{instruction}\n\n{inp}"
        answer = output
    else:
        key = "response" if shape == "prompt_response" else "completion"
        prompt, answer = rec["prompt"], rec[key]
        if not isinstance(prompt, str) or not isinstance(answer, str):
            return f"prompt and {key} must be strings"
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        return "system must be a string"
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


# --- rendering and masks -------------------------------------------------------------------


def encode_chat(
    tok: Any,
    messages: Sequence[dict[str, str]],
    *,
    template: str | None,
    end_id: int,
    loss_on: str = "assistant",
) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids, mask, answer_start) of a conversation rendered with `template`.

    `ids` equal encoding the whole rendered text; `mask` is 1 on the tokens of every assistant
    turn up to and including its last `end_id` (loss_on="all": on every token); answer_start
    is the first token of the last assistant turn (what truncation keeps). Raises
    TemplateError when the template renders a prefix differently from the whole, or does not
    end assistant turns with the end-of-turn token.
    """
    from llmctl.tokenizer import render_chat

    full = render_chat(messages, template=template)
    enc = tok.encode(full, add_special_tokens=False)
    ids = np.asarray(enc.ids, dtype=np.int64)
    starts = np.asarray([a for a, _ in enc.offsets], dtype=np.int64)
    ends = np.asarray([b for _, b in enc.offsets], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=np.int64)
    answer_start = 0
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_chat(messages[:k], add_generation_prompt=True, template=template)
        through = render_chat(messages[: k + 1], template=template)
        if not (full.startswith(before) and full.startswith(through)) or len(through) <= len(
            before
        ):
            raise TemplateError(
                "chat template: rendering a conversation turn by turn does not give a prefix "
                "of the whole (add_generation_prompt differs from how assistant turns are "
                "rendered), so assistant tokens cannot be located"
            )
        a, b = len(before), len(through)
        inside = (starts >= a) & (ends <= b)
        straddle = ((starts < a) & (ends > a)) | ((starts < b) & (ends > b))
        if straddle.any():
            raise TemplateError(
                "chat template: a token spans the start or end of an assistant turn; the "
                "template must separate turns with special tokens"
            )
        idx = np.flatnonzero(inside)
        closing = idx[ids[idx] == end_id]
        if len(closing) == 0:
            raise TemplateError(
                f"chat template: assistant turns do not end with the end-of-turn token "
                f"(id {end_id}), so a model trained on it would not learn to stop"
            )
        mask[idx[0] : closing[-1] + 1] = 1
        answer_start = int(idx[0])
    if loss_on == "all":
        mask[:] = 1
    return ids, mask, answer_start


def truncate(
    ids: np.ndarray, mask: np.ndarray, answer_start: int, ctx: int
) -> tuple[np.ndarray, np.ndarray, bool, bool]:
    """(ids, mask, prompt_cut, answer_cut) cut to at most `ctx` tokens: the prompt from the
    left so that min(answer length, ctx // 2) answer tokens fit, then the answer at ctx."""
    n_prompt, n_answer = answer_start, len(ids) - answer_start
    if n_prompt + n_answer <= ctx:
        return ids, mask, False, False
    keep_prompt = min(n_prompt, ctx - min(n_answer, ctx // 2))
    cut = n_prompt - keep_prompt
    ids, mask = ids[cut:][:ctx], mask[cut:][:ctx]
    return ids, mask, cut > 0, keep_prompt + n_answer > ctx


def special_strings(tok: Any) -> list[str]:
    """The text of every special (added) token, which must not appear inside message text."""
    return [t.content for t in tok.get_added_tokens_decoder().values()]


def _example(
    tok: Any,
    rec: Any,
    shape: str,
    where: tuple[str, int],
    *,
    specials: Sequence[str],
    template: str | None,
    end_id: int,
    ctx: int,
    loss_on: str,
) -> tuple[Example, bool, bool] | BadRecord | None:
    """(example, prompt_cut, answer_cut) of one record of a file of `shape`; a BadRecord when
    it is malformed; None when truncation leaves it no target token."""
    name, line = where
    if shape_of(rec) != shape:
        got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        why = f"expected {SHAPE_KEYS[shape]}, got {got}"
        return BadRecord(name, line, "wrong_shape", why[:EXCERPT_CHARS])
    msgs = to_messages(rec, shape)
    if isinstance(msgs, str):
        return BadRecord(name, line, "bad_field", msgs[:EXCERPT_CHARS])
    for m in msgs:
        hit = next((s for s in specials if s in m["content"]), None)
        if hit is not None:
            why = f"{m['role']} text contains {hit}"
            return BadRecord(name, line, "special_token_in_text", why)
        if any(0xD800 <= ord(c) <= 0xDFFF for c in m["content"]):
            return BadRecord(name, line, "lone_surrogate", f"in a {m['role']} message")
    ids, mask, answer_start = encode_chat(
        tok, msgs, template=template, end_id=end_id, loss_on=loss_on
    )
    ids, mask, prompt_cut, answer_cut = truncate(ids, mask, answer_start, ctx)
    mask = mask.copy()
    mask[0] = 0  # never a target: in a packed row it follows another example
    if not mask.any():
        return None
    return Example(ids, mask, f"{name}:{line}"), prompt_cut, answer_cut


def _first_keys(rec: Any) -> str:
    if isinstance(rec, dict):  # printable even when a key holds a lone surrogate
        keys = ", ".join(sorted(map(str, rec)))[:120] or "none"
        return keys.encode("utf-8", "replace").decode("utf-8")
    return f"a JSON {type(rec).__name__}, not an object"


def load_chats(
    paths: Iterable[Path | str],
    tok: Any,
    *,
    template: str | None,
    end_id: int,
    ctx: int,
    opts: ChatDataConfig,
) -> ChatData:
    """Read, check, render, mask and cut every record of `paths` (see the module doc).

    Raises UsageError (exit 2) for a file with no record of a known shape, a file with no
    usable example (all malformed, or all cut to no assistant token), a template that cannot
    be used, and (with `opts.strict`) the first malformed record.
    """
    files = resolve_chat_files(paths)
    kw = dict(specials=special_strings(tok), template=template, end_id=end_id, ctx=ctx,
              loss_on=opts.loss_on)  # fmt: skip
    counts = ("records", "examples", "prompt_cut", "answer_cut", "no_assistant_tokens")
    data = ChatData([], [], {"files": {}, **dict.fromkeys(counts, 0), "rejected": {}})
    stats = data.stats

    def reject(bad: BadRecord) -> None:
        keep_aside(bad, data.rejected, stats["rejected"], opts.strict)

    for path in files:
        name = str(path)
        shape: str | None = None
        pending: list[tuple[int, Any]] = []  # records seen before the file's shape is known
        n_records = n_parsed = n_ok = n_empty = 0  # records: parsed or not (empty file: 0)
        first_keys = ""
        for item in iter_records(path, opts.max_line_bytes):
            if isinstance(item, BadRecord):
                n_records += item.reason != "empty_file"
                reject(item)
                continue
            n_records += 1
            n_parsed += 1
            if shape is None:
                first_keys = first_keys or _first_keys(item[1])
                shape = shape_of(item[1])
                if shape is None:
                    pending.append(item)
                    continue
            for line, rec in [*pending, item]:
                out = _example(tok, rec, shape, (name, line), **kw)  # type: ignore[arg-type]
                if isinstance(out, BadRecord):
                    reject(out)
                elif out is None:
                    n_empty += 1
                else:
                    data.examples.append(out[0])
                    stats["prompt_cut"] += out[1]
                    stats["answer_cut"] += out[2]
                    n_ok += 1
            pending = []
        stats["records"] += n_records
        if shape is None:
            if n_parsed == 0:
                first = data.rejected[-1].reason if data.rejected else "empty_file"
                raise UsageError(f"{name}: no readable record ({first})")
            raise UsageError(
                f"{name}: no record has a known shape (expected "
                f"{'; '.join(SHAPE_KEYS.values())}); the first record has keys: {first_keys}"
            )
        stats["no_assistant_tokens"] += n_empty
        if n_ok == 0:
            if n_empty:
                raise UsageError(
                    f"{name}: all {n_empty} usable examples truncate to no assistant token at "
                    f"a context of {ctx} tokens (raise seq_len or shorten the prompts)"
                )
            raise UsageError(
                f"{name}: no usable example: all {n_records} records are malformed "
                f"({shape} shape; reasons: {stats['rejected']})"
            )
        stats["files"][name] = {"shape": shape, "records": n_records, "examples": n_ok}
    stats["examples"] = len(data.examples)
    stats["rejected_total"] = len(data.rejected)
    return data


def split_examples(
    examples: Sequence[Example], val_fraction: float
) -> tuple[list[Example], list[Example]]:
    """(train, val): an example is held out when a hash of its tokens falls below
    `val_fraction`, so exact duplicates never straddle the split. With a fraction > 0 and at
    least two examples, at least one is held out and at least one trains."""
    if val_fraction <= 0 or len(examples) < 2:
        return list(examples), []
    keys = [
        int.from_bytes(hashlib.sha256(e.ids.astype("<i8").tobytes()).digest()[:8], "big") / 2**64
        for e in examples
    ]
    held = [k < val_fraction for k in keys]
    if not any(held):
        held[int(np.argmin(keys))] = True
    if all(held):
        held[int(np.argmax(keys))] = False
    train = [e for e, h in zip(examples, held, strict=True) if not h]
    val = [e for e, h in zip(examples, held, strict=True) if h]
    return train, val


# --- rows ------------------------------------------------------------------------------------


class ChatRows:
    """Micro-batches of `batch_size` rows of `row_len` tokens from `examples`.

    Packed: each epoch shuffles the examples by (seed, epoch) and fills rows next-fit; a row
    holds whole examples only (every example is at most `row_len` tokens after `truncate`).
    Padded: one example per row. `shuffle=False` keeps the input order (validation).
    `sample(i)` is micro-batch i of the endless stream of rows, epoch after epoch.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        *,
        row_len: int,
        batch_size: int,
        pack: bool,
        seed: int,
        pad_id: int,
        shuffle: bool = True,
    ) -> None:
        if not examples:
            raise UsageError("no examples to make rows from")
        too_long = max(len(e.ids) for e in examples)
        if too_long > row_len:
            raise ValueError(f"ChatRows: an example has {too_long} tokens > row_len {row_len}")
        self.examples, self.row_len, self.batch_size = list(examples), row_len, batch_size
        self.pack, self.seed, self.pad_id, self.shuffle = pack, seed, pad_id, shuffle
        self._epochs: list[list[list[int]]] = []
        self._ends: list[int] = []  # cumulative row counts at the end of each planned epoch

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """The rows of `epoch`, each a list of example indices."""
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            order = np.arange(len(self.examples))
            if self.shuffle:
                order = np.random.default_rng([self.seed, e]).permutation(len(self.examples))
            rows: list[list[int]] = []
            used = self.row_len  # forces a new row first
            for j in order.tolist():
                n = len(self.examples[j].ids)
                if self.pack and used + n <= self.row_len:
                    rows[-1].append(j)
                    used += n
                else:
                    rows.append([j])
                    used = n
            self._epochs.append(rows)
            self._ends.append((self._ends[-1] if self._ends else 0) + len(rows))
        return self._epochs[epoch]

    def rows_per_epoch(self, epoch: int = 0) -> int:
        return len(self.epoch_plan(epoch))

    def rows_in_epochs(self, epochs: float) -> int:
        """Rows in the first `epochs` epochs (fractional epochs count that share of the next)."""
        whole = int(epochs)
        n = sum(self.rows_per_epoch(e) for e in range(whole))
        if epochs > whole:
            n += math.ceil((epochs - whole) * self.rows_per_epoch(whole))
        return n

    def _locate(self, row: int) -> tuple[int, int]:
        e = 0
        while True:
            self.epoch_plan(e)
            if row < self._ends[e]:
                return e, row - (self._ends[e - 1] if e else 0)
            e += 1

    def epoch_of(self, rows: int) -> float:
        """How many epochs `rows` rows are (for the stats)."""
        if rows <= 0:
            return 0.0
        e, r = self._locate(rows - 1)
        return e + (r + 1) / self.rows_per_epoch(e)

    def row(self, index: int) -> dict[str, np.ndarray]:
        """Row `index` of the stream: tokens, loss_mask and, when packed, position_ids and
        segment_ids (1, 2, ... per example; 0 on padding)."""
        e, r = self._locate(index)
        return self.make_row(self.epoch_plan(e)[r])

    def make_row(self, members: Sequence[int]) -> dict[str, np.ndarray]:
        tokens = np.full(self.row_len, self.pad_id, dtype=np.int64)
        mask = np.zeros(self.row_len, dtype=np.int64)
        pos = np.zeros(self.row_len, dtype=np.int64)
        seg = np.zeros(self.row_len, dtype=np.int64)
        at = 0
        for s, j in enumerate(members, start=1):
            ex = self.examples[j]
            n = len(ex.ids)
            tokens[at : at + n], mask[at : at + n] = ex.ids, ex.mask
            pos[at : at + n], seg[at : at + n] = np.arange(n), s
            at += n
        out = {"tokens": tokens, "loss_mask": mask}
        if self.pack:
            # padding continues the positions so they stay within the context
            pos[at:] = np.arange(self.row_len - at)
            out |= {"position_ids": pos, "segment_ids": seg}
        return out

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Micro-batch `i`: rows [i * batch_size, (i + 1) * batch_size) of the stream."""
        rows = [self.row(i * self.batch_size + b) for b in range(self.batch_size)]
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        if not batch["loss_mask"][:, 1:].any():  # cannot happen with load_chats' examples
            raise UsageError(f"micro-batch {i}: every loss-mask value is zero (no target token)")
        return batch

    def sequential(self, max_batches: int) -> Iterator[dict[str, np.ndarray]]:
        """The first epoch's rows in order, `batch_size` at a time (the last may be short),
        at most `max_batches` batches (validation)."""
        plan = self.epoch_plan(0)
        for b in range(0, min(len(plan), max_batches * self.batch_size), self.batch_size):
            rows = [self.make_row(m) for m in plan[b : b + self.batch_size]]
            yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    def fill(self) -> float:
        """Share of row positions that hold example tokens in the first epoch (packing
        efficiency)."""
        plan = self.epoch_plan(0)
        used = sum(len(self.examples[j].ids) for r in plan for j in r)
        return used / (len(plan) * self.row_len)


@dataclass
class ChatSets:
    """What a training command needs from chat data (see `prepare_chats`)."""

    data: ChatData  # examples, rejected records, stats
    train: ChatRows
    val: ChatRows | None  # None when too few examples to hold any out
    template: str  # the template rendered with
    base_template: str | None  # the checkpoint's own (None: it had none)
    files: list[Path]  # the data files read, in order

    def val_batches(self, max_batches: int) -> Callable[[], Iterator[dict[str, Any]]] | None:
        """For the loop's `val=`: fresh tensor batches of the held-out rows, or None."""
        from llmctl.train.batches import as_tensors

        rows = self.val
        if rows is None:
            return None
        return lambda: (as_tensors(b) for b in rows.sequential(max_batches))


def prepare_chats(
    checkpoint: Path,
    data: Iterable[Path | str],
    opts: ChatDataConfig,
    *,
    tok: Any,
    specials: Any,
    seq_len: int,
    batch_size: int,
    seed: int,
) -> ChatSets:
    """Read `data` for tuning `checkpoint` (whose tokenizer and `load_specials` result are
    given): render with its chat template (llmctl's when it has none), mask, cut to rows of
    `seq_len + 1` tokens, split off the held-out examples and plan the rows. Every data
    problem raises here, before a command creates anything on disk."""
    from llmctl.tokenizer import CHAT_TEMPLATE, chat_template_of

    base_template = chat_template_of(checkpoint)
    template = base_template or CHAT_TEMPLATE
    row_len = seq_len + 1  # T inputs and T targets
    loaded = load_chats(
        data, tok, template=template, end_id=specials.end_of_turn, ctx=row_len, opts=opts
    )
    train_ex, val_ex = split_examples(loaded.examples, opts.val_fraction)
    # Padding hides behind the loss mask (a position, never an id, decides what is a target),
    # so pad may be any id; llmctl's <|pad|> is distinct from <|end|> anyway.
    kw = dict(row_len=row_len, batch_size=batch_size, pack=opts.packing, seed=seed,
              pad_id=specials.pad_or_eos)  # fmt: skip
    train = ChatRows(train_ex, **kw)  # type: ignore[arg-type]
    val = ChatRows(val_ex, **kw, shuffle=False) if val_ex else None  # type: ignore[arg-type]
    files = [Path(f) for f in loaded.stats["files"]]
    return ChatSets(loaded, train, val, template, base_template, files)


def write_rejected(dir: Path, rejected: Iterable[BadRecord]) -> Path:
    """`dir/rejected/errors.jsonl` with every rejected record (an empty file when none)."""
    from llmctl.data.docs import ErrorLog

    path = dir / "rejected" / "errors.jsonl"
    with ErrorLog(path) as log:
        for bad in rejected:
            log.add(bad)
    return path


def data_digest(files: Iterable[Path]) -> list[str]:
    """sha256 of each data file (the run's fingerprint: changed data cannot resume)."""
    from llmctl.artifacts import sha256_file

    return [sha256_file(Path(f)) for f in files]
