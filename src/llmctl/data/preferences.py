"""Preference data: pair (and KTO) files in, tokenized chosen/rejected rows out.

Used by `align` and `eval RM PAIRS`. Files are read as `data/chats.py` reads chat files
(`.json` arrays or objects, JSON lines, `.jsonl(.gz/.zst)`, folders of them); each file's shape
is detected from its first record that has one:

- `pair`: `{"prompt", "chosen", "rejected"}`; prompt a string or a message list, each answer a
  string or a list of one assistant message (TRL's conversational form);
- `transcript`: `{"chosen", "rejected"}` only: full transcripts sharing their prefix. Strings
  in hh-rlhf's `\\n\\nHuman: ... \\n\\nAssistant: ...` form are split at the last Assistant
  turn and parsed into messages; message lists are split after their common prefix;
- `sharegpt`: `{"conversations": [{"from", "value"}...], "chosen": {...}, "rejected": {...}}`
  (LLaMA-Factory's form; `human`/`gpt`/`system` roles);
- `kto`: `{"prompt", "completion", "label": bool}` or `{"messages": [...], "label": bool}`
  (the last message is the completion, it must be the assistant's).

Every item is rendered with the checkpoint's chat template (the prompt's turns, then the
answer as the final assistant turn) and masked to the answer's tokens (its end-of-turn token
included). Long items are cut as SFT examples are (`chats.truncate`: the prompt from the left,
keeping the answer's start), after `max_prompt_tokens` (if set) caps the prompt; cut items are
counted. A record that does not fit its file's shape, a pair with an empty side, a pair whose
two sides are the same, or one that no answer token survives is a `BadRecord`: skipped,
counted by reason, kept for `rejected/errors.jsonl` (`strict`: the first one is an error).

KTO items carry a second row, the "KL row": their prompt with the completion of the next item
(a fixed derangement), whose log-ratio estimates the KTO reference point z (as TRL does with
mismatched pairs within a batch, but fixed per item so it can be cached).

Example:
    data = load_preferences([Path("pairs.jsonl")], tok, template=None, end_id=end, ctx=257,
                            opts=PreferenceDataConfig(), kto=False)
    train, val = split_items(data.items, 0.1)
    rows = PairRows(train, batch_size=8, seed=0, pad_id=pad)
    batch = rows.sample(0)  # {"tokens", "loss_mask", "lengths", "index"} [2B, L], [2B], [B]
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmctl.config import helpful
from llmctl.data.chats import (
    encode_chat,
    iter_records,
    parse_messages,
    resolve_chat_files,
    special_strings,
    truncate,
)
from llmctl.data.docs import EXCERPT_CHARS, BadRecord, keep_aside
from llmctl.errors import UsageError

SHAPES = {
    "pair": "prompt + chosen + rejected",
    "transcript": "chosen + rejected (full transcripts)",
    "sharegpt": "conversations + chosen + rejected",
    "kto": "prompt + completion + label, or messages + label",
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}  # fmt: skip
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


@dataclass(frozen=True)
class PreferenceDataConfig:
    """How preference data is read, cut and split (`align` inherits it)."""

    max_prompt_tokens: int = helpful(
        0, "cut prompts to their last N tokens before fitting the context (0 = no cap)"
    )
    val_fraction: float = helpful(0.1, "share of pairs held out for evaluation (by hash)")
    strict: bool = helpful(False, "fail at the first malformed record instead of skipping it")
    max_line_bytes: int = helpful(16 * 1024 * 1024, "longer JSONL lines are skipped as malformed")

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(
                f"config key 'val_fraction': must be in [0, 1), got {self.val_fraction}"
            )
        if self.max_prompt_tokens < 0:
            raise UsageError("config key 'max_prompt_tokens': must be >= 0")


@dataclass(slots=True)
class Item:
    """One tokenized preference item: two rows (`ids[k]`, `mask[k]`: 1 on answer tokens) —
    chosen and rejected for a pair; the completion and its KL row for KTO (`label` set)."""

    ids: tuple[np.ndarray, np.ndarray]
    mask: tuple[np.ndarray, np.ndarray]
    where: str
    label: bool | None = None
    cut: bool = False


@dataclass
class PreferenceData:
    """What `load_preferences` read: usable items, the records it rejected, and counts."""

    items: list[Item]
    rejected: list[BadRecord]
    stats: dict[str, Any] = field(default_factory=dict)


# --- shapes ----------------------------------------------------------------------------------


def shape_of(rec: Any) -> str | None:
    """The shape whose keys `rec` has, or None."""
    if not isinstance(rec, dict):
        return None
    if "label" in rec and ("completion" in rec or "messages" in rec):
        return "kto"
    if "chosen" in rec and "rejected" in rec:
        if "conversations" in rec:
            return "sharegpt"
        return "pair" if "prompt" in rec else "transcript"
    return None


Messages = list[dict[str, str]]
Parsed = tuple[Messages, str, str | None, bool | None]  # prompt, answer, other answer, label


def _answer(value: Any, key: str, roles: dict[str, str] | None = None) -> str:
    """An answer: a string, one assistant message, or a list of one. Raises ValueError."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    msgs = parse_messages(value, key, roles)
    if isinstance(msgs, str):
        raise ValueError(msgs)
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise ValueError(f"{key} must be a string or one assistant message")
    return msgs[0]["content"]


def split_hh(chosen: str, rejected: str) -> tuple[Messages, str, str]:
    """(prompt messages, chosen answer, rejected answer) of two hh-rlhf transcripts: the
    shared text up to the last `\\n\\nAssistant:` of the chosen one is the prompt."""
    cut = chosen.rfind("\n\nAssistant:")
    if cut < 0:
        raise ValueError("chosen transcript has no '\\n\\nAssistant:' turn")
    prefix = chosen[:cut]
    if not rejected.startswith(prefix + "\n\nAssistant:"):
        raise ValueError("chosen and rejected transcripts do not share the dialogue before "
                         "the last Assistant turn")  # fmt: skip
    answer = len(prefix) + len("\n\nAssistant:")
    parts = HH_TURN.split(prefix)
    msgs: Messages = []
    if parts[0].strip():  # text before the first marker: a system-like preamble
        msgs.append({"role": "user", "content": parts[0].strip()})
    for role, text in zip(parts[1::2], parts[2::2], strict=True):
        msgs.append({"role": "user" if role == "Human" else "assistant", "content": text.strip()})
    if not msgs or msgs[-1]["role"] != "user":
        raise ValueError("the transcript's last turn before the answer is not the Human's")
    return msgs, chosen[answer:].strip(), rejected[answer:].strip()


def parse(rec: dict[str, Any], shape: str) -> Parsed:
    """(prompt messages, answer, rejected answer or None, label or None) of a record of
    `shape`. Raises ValueError with a short reason when it does not fit."""
    if shape == "kto":
        label = rec["label"]
        if not isinstance(label, bool):
            raise ValueError("label must be true or false")
        if "messages" in rec:
            msgs = parse_messages(rec["messages"], "messages")
            if isinstance(msgs, str):
                raise ValueError(msgs)
            if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
                raise ValueError("messages must end with the assistant's completion")
            return msgs[:-1], msgs[-1]["content"], None, label
        return _prompt(rec["prompt"]), _answer(rec["completion"], "completion"), None, label
    if shape == "sharegpt":
        msgs = parse_messages(rec["conversations"], "conversations", SHAREGPT_ROLES)
        if isinstance(msgs, str):
            raise ValueError(msgs)
        return (msgs, _answer(rec["chosen"], "chosen", SHAREGPT_ROLES),
                _answer(rec["rejected"], "rejected", SHAREGPT_ROLES), None)  # fmt: skip
    if shape == "pair":
        return (_prompt(rec["prompt"]), _answer(rec["chosen"], "chosen"),
                _answer(rec["rejected"], "rejected"), None)  # fmt: skip
    chosen, rejected = rec["chosen"], rec["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        return (*split_hh(chosen, rejected), None)
    c, r = parse_messages(chosen, "chosen"), parse_messages(rejected, "rejected")
    if isinstance(c, str) or isinstance(r, str):
        raise ValueError(c if isinstance(c, str) else r)  # type: ignore[arg-type]
    n = 0
    while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
        n += 1
    if c[n:][:1] == [] or len(c) - n != 1 or len(r) - n != 1 or c[n]["role"] != "assistant":
        raise ValueError("chosen and rejected must share all messages but one final "
                         "assistant message")  # fmt: skip
    return c[:n], c[n]["content"], r[n]["content"], None


def _prompt(value: Any) -> Messages:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    msgs = parse_messages(value, "prompt")
    if isinstance(msgs, str):
        raise ValueError(msgs)
    return msgs


# --- encoding ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoder:
    """Renders (prompt, answer) with the chat template and cuts it to `ctx` tokens."""

    tok: Any
    template: str | None
    end_id: int
    ctx: int
    max_prompt_tokens: int = 0

    def __call__(self, prompt: Messages, answer: str) -> tuple[np.ndarray, np.ndarray, bool]:
        """(ids, answer mask, cut) of the prompt's turns plus `answer` as the last turn."""
        msgs = [*prompt, {"role": "assistant", "content": answer}]
        ids, mask, start = encode_chat(self.tok, msgs, template=self.template, end_id=self.end_id)
        mask = mask.copy()
        mask[:start] = 0  # earlier assistant turns are context, not the answer
        cut = False
        if self.max_prompt_tokens and start > self.max_prompt_tokens:
            drop = start - self.max_prompt_tokens
            ids, mask, start, cut = ids[drop:], mask[drop:], self.max_prompt_tokens, True
        ids, mask, prompt_cut, answer_cut = truncate(ids, mask, start, self.ctx)
        mask = mask.copy()
        mask[0] = 0  # never a target (nothing predicts it)
        return ids, mask, cut or prompt_cut or answer_cut


def _check_text(texts: Iterable[tuple[str, str]], specials: Sequence[str]) -> str | None:
    for what, text in texts:
        hit = next((s for s in specials if s in text), None)
        if hit is not None:
            return f"{what} text contains {hit}"
        if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            return f"lone surrogate in {what} text"
    return None


def _record_item(
    rec: Any, shape: str, where: tuple[str, int], enc: Encoder, specials: Sequence[str]
) -> tuple[Messages, str, str | None, bool | None] | BadRecord:
    name, line = where
    if shape_of(rec) != shape:
        got = sorted(map(str, rec)) if isinstance(rec, dict) else type(rec).__name__
        return BadRecord(name, line, "wrong_shape", f"expected {SHAPES[shape]}, got {got}"[:200])
    try:
        prompt, answer, other, label = parse(rec, shape)
    except ValueError as e:
        return BadRecord(name, line, "bad_field", str(e)[:EXCERPT_CHARS])
    texts = [(m["role"], m["content"]) for m in prompt] + [("answer", answer)]
    texts += [("rejected", other)] if other is not None else []
    why = _check_text(texts, specials)
    if why:
        return BadRecord(name, line, "special_token_in_text", why)
    if not answer.strip() or (other is not None and not other.strip()):
        side = "chosen" if not answer.strip() else "rejected"
        what = "completion" if label is not None else side
        return BadRecord(name, line, "empty_side", f"the {what} answer is empty")
    if other is not None and answer == other:
        return BadRecord(name, line, "identical_pair", "chosen and rejected are the same text")
    return prompt, answer, other, label


def load_preferences(
    sources: Iterable[Path | str] | Sequence[dict[str, Any]],
    tok: Any,
    *,
    template: str | None,
    end_id: int,
    ctx: int,
    opts: PreferenceDataConfig,
    kto: bool = False,
) -> PreferenceData:
    """Read, check, render, mask and cut every record of `sources`: data files (see the
    module doc), or in-memory records (dicts of any shape, e.g. generated pairs). With `kto`,
    pairs become two labelled items (chosen: desirable, rejected: undesirable) and every item
    gets its KL row; without, KTO records are refused (they have no pair).

    Raises UsageError for a file with no record of a known shape, no usable item at all,
    and (`opts.strict`) the first malformed record.
    """
    enc = Encoder(tok, template, end_id, ctx, opts.max_prompt_tokens)
    specials = special_strings(tok)
    counts = ("records", "pairs", "cut")
    data = PreferenceData([], [], {"files": {}, **dict.fromkeys(counts, 0), "rejected": {}})
    stats = data.stats
    parsed: list[tuple[Messages, str, str | None, bool | None, str]] = []

    def reject(bad: BadRecord) -> None:
        keep_aside(bad, data.rejected, stats["rejected"], opts.strict)

    for name, records in _sources(sources, opts):
        shape: str | None = None
        pending: list[tuple[int, Any]] = []
        n_records = n_ok = 0
        first_keys = ""
        for item in records:
            if isinstance(item, BadRecord):
                n_records += item.reason != "empty_file"
                reject(item)
                continue
            n_records += 1
            if shape is None:
                if not first_keys:
                    first_keys = _first_keys(item[1])
                shape = shape_of(item[1])
                if shape is None:
                    pending.append(item)
                    continue
                if shape == "kto" and not kto:
                    raise UsageError(f"{name}: KTO records (completion + label) have no "
                                     "rejected side; use --method kto")  # fmt: skip
            for line, rec in [*pending, item]:
                out = _record_item(rec, shape, (name, line), enc, specials)
                if isinstance(out, BadRecord):
                    reject(out)
                else:
                    parsed.append((*out, f"{name}:{line}"))
                    n_ok += 1
            pending = []
        stats["records"] += n_records
        if shape is None:
            if n_records == 0 or not first_keys:
                first = data.rejected[-1].reason if data.rejected else "empty_file"
                raise UsageError(f"{name}: no readable record ({first})")
            raise UsageError(f"{name}: no record has a known shape (expected "
                             f"{'; '.join(SHAPES.values())}); the first record has keys: "
                             f"{first_keys}")  # fmt: skip
        stats["files"][name] = {"shape": shape, "records": n_records, "usable": n_ok}
    _encode_all(parsed, enc, kto, data, reject)
    if not data.items:
        raise UsageError(f"no usable preference item in {', '.join(stats['files'])} "
                         f"(rejected: {stats['rejected'] or 'none'})")  # fmt: skip
    stats["rejected_total"] = len(data.rejected)
    return data


def _first_keys(rec: Any) -> str:
    if isinstance(rec, dict):
        keys = ", ".join(sorted(map(str, rec)))[:120] or "none"
        return keys.encode("utf-8", "replace").decode("utf-8")
    return f"a JSON {type(rec).__name__}, not an object"


def _sources(
    sources: Iterable[Path | str] | Sequence[dict[str, Any]], opts: PreferenceDataConfig
) -> Iterable[tuple[str, Iterable[tuple[int, Any] | BadRecord]]]:
    items = list(sources)
    if items and all(isinstance(s, dict) for s in items):
        yield "memory", list(enumerate(items, start=1))
        return
    for path in resolve_chat_files(items):  # type: ignore[arg-type]
        yield str(path), iter_records(path, opts.max_line_bytes)


def _encode_all(
    parsed: list[tuple[Messages, str, str | None, bool | None, str]],
    enc: Encoder,
    kto: bool,
    data: PreferenceData,
    reject: Any,
) -> None:
    """Tokenize the parsed records into items (pairs, or KTO items with their KL rows)."""
    units: list[tuple[Messages, str, bool | None, str]] = []  # KTO: (prompt, answer, label)
    for prompt, answer, other, label, where in parsed:
        if not kto:
            a, ma, ca = enc(prompt, answer)
            b, mb, cb = enc(prompt, other)  # type: ignore[arg-type]
            file, line = where.rsplit(":", 1)
            if not ma.any() or not mb.any():
                reject(BadRecord(file, int(line), "no_answer_tokens",
                                 f"no answer token fits a context of {enc.ctx}"))  # fmt: skip
                continue
            if np.array_equal(a, b):
                why = "chosen and rejected are the same after cutting to the context"
                reject(BadRecord(file, int(line), "identical_after_cut", why))
                continue
            data.items.append(Item((a, b), (ma, mb), where, cut=ca or cb))
            data.stats["pairs"] += 1
            data.stats["cut"] += ca or cb
        elif other is not None:
            units += [(prompt, answer, True, where), (prompt, other, False, where)]
        else:
            units.append((prompt, answer, label, where))
    for k, (prompt, answer, label, where) in enumerate(units):
        a, ma, ca = enc(prompt, answer)
        kl_answer = units[(k + 1) % len(units)][1]  # the next item's completion
        b, mb, cb = enc(prompt, kl_answer)
        if not ma.any() or not mb.any():
            file, line = where.rsplit(":", 1)
            reject(BadRecord(file, int(line), "no_answer_tokens",
                             f"no answer token fits a context of {enc.ctx}"))  # fmt: skip
            continue
        data.items.append(Item((a, b), (ma, mb), where, label=label, cut=ca))
        data.stats["pairs"] += 1
        data.stats["cut"] += ca


def split_items(items: Sequence[Item], val_fraction: float) -> tuple[list[int], list[int]]:
    """(train, val) item indices: an item is held out when a hash of its rows falls below
    `val_fraction` (at least one each way when there are two or more items)."""
    if val_fraction <= 0 or len(items) < 2:
        return list(range(len(items))), []
    keys = []
    for it in items:
        h = hashlib.sha256(
            it.ids[0].astype("<i8").tobytes() + b"|" + it.ids[1].astype("<i8").tobytes()
        )
        keys.append(int.from_bytes(h.digest()[:8], "big") / 2**64)
    held = [k < val_fraction for k in keys]
    if not any(held):
        held[int(np.argmin(keys))] = True
    if all(held):
        held[int(np.argmax(keys))] = False
    return [i for i, h in enumerate(held) if not h], [i for i, h in enumerate(held) if h]


def items_digest(items: Sequence[Item]) -> str:
    """sha256 over every item's rows, masks and label: what a reference cache is keyed by."""
    h = hashlib.sha256()
    for it in items:
        for a in (*it.ids, *it.mask):
            h.update(a.astype("<i8").tobytes())
            h.update(b"|")
        h.update(json.dumps(it.label).encode())
    return h.hexdigest()


# --- rows ------------------------------------------------------------------------------------


class PairRows:
    """Micro-batches of `batch_size` items (indices into `items`), shuffled per epoch by
    (seed, epoch). `sample(i)` holds 2B rows, right-padded to the longest: the items' first
    rows, then their second rows (chosen then rejected; completion then KL row).
    Keys: `tokens`, `loss_mask` [2B, L]; `lengths` [2B] (real tokens per row); `index` [B]
    (item indices, for cached reference log-probs); `label` [B] for KTO items."""

    def __init__(self, items: Sequence[Item], order: Sequence[int], *, batch_size: int,
                 seed: int, pad_id: int, shuffle: bool = True) -> None:  # fmt: skip
        if not order:
            raise UsageError("no preference items to train on")
        self.items, self.order = items, list(order)
        self.batch_size, self.seed, self.pad_id, self.shuffle = batch_size, seed, pad_id, shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _at(self, position: int) -> int:
        epoch, slot = divmod(position, len(self.order))
        if epoch not in self._perms:
            perm = np.arange(len(self.order))
            if self.shuffle:
                perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.order))
            self._perms = {epoch: perm}  # only the current epoch is kept
        return self.order[int(self._perms[epoch][slot])]

    def epoch_of(self, batches: int) -> float:
        return batches * self.batch_size / len(self.order)

    def make(self, members: Sequence[int]) -> dict[str, np.ndarray]:
        its = [self.items[j] for j in members]
        rows = [it.ids[0] for it in its] + [it.ids[1] for it in its]
        masks = [it.mask[0] for it in its] + [it.mask[1] for it in its]
        n = max(len(r) for r in rows)
        tokens = np.full((len(rows), n), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), n), dtype=np.int64)
        for k, (r, m) in enumerate(zip(rows, masks, strict=True)):
            tokens[k, : len(r)], mask[k, : len(r)] = r, m
        out = {"tokens": tokens, "loss_mask": mask,
               "lengths": np.array([len(r) for r in rows], dtype=np.int64),
               "index": np.array(members, dtype=np.int64)}  # fmt: skip
        if its[0].label is not None:
            out["label"] = np.array([bool(it.label) for it in its], dtype=np.int64)
        return out

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Micro-batch `i` of the endless stream, epoch after epoch."""
        B = self.batch_size
        return self.make([self._at(i * B + b) for b in range(B)])

    def sequential(self, max_items: int = 0) -> Iterable[dict[str, np.ndarray]]:
        """The items in order (at most `max_items`, 0 = all), `batch_size` at a time."""
        order = self.order[:max_items] if max_items else self.order
        for b in range(0, len(order), self.batch_size):
            yield self.make(order[b : b + self.batch_size])
