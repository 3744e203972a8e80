"""Teacher answers to prompts, for response distillation: from a checkpoint, an API or a file.

`distill --kind sequence|api` gathers one answer per prompt and trains the student on them.
The answers come from:
- a local checkpoint (`model_answers`: `train.rollout.complete`, fitted to the teacher's
  context, its sampling seed tied to the prompt's index);
- an OpenAI-compatible chat-completions endpoint (`api_answers`: POST `{base}/chat/completions`
  with httpx; a timeout per request, retries with exponential backoff on 429, 5xx, timeouts and
  connection errors (honouring a numeric Retry-After), at most `concurrency` requests in flight;
  the key comes from `OPENAI_API_KEY` and only ever goes into the Authorization header);
- a JSONL file of `{"prompt", "response"}` records gathered elsewhere (`file_answers`).

Every answer (and every final failure) is appended to an `AnswerCache` inside the in-progress
output as soon as it arrives, keyed by the teacher, its settings, the prompt and its index, so an
interrupted run asks only for what it does not have yet. A prompt that still fails after its
retries is counted and kept aside (never silently dropped); a rerun asks for it again as long
as training has not started.

Example:
    cache = AnswerCache(partial / "_state" / "answers.jsonl", teacher_id)
    got = api_answers(prompts, ApiSettings(model="gpt-4o-mini"), "http://localhost:8000/v1", cache)
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.config import helpful
from llmctl.errors import UsageError
from llmctl.files import read_bytes

Prompt = str | list[dict[str, str]]  # plain text, or chat messages


@dataclass(frozen=True)
class ApiSettings:
    """How the API teacher is asked."""

    model: str = helpful("gpt-4o-mini", "model name sent to the endpoint")
    max_tokens: int = helpful(256, "most tokens per answer")
    temperature: float = helpful(0.0, "sampling temperature sent to the endpoint")
    system: str = helpful("", "system message put before each plain prompt (empty: none)")
    timeout: float = helpful(60.0, "seconds per request before it counts as failed (and retried)")
    retries: int = helpful(5, "retries per prompt after the first attempt")
    backoff: float = helpful(1.0, "first retry wait in seconds; doubles each retry")
    max_backoff: float = helpful(60.0, "longest wait between retries, Retry-After included")
    concurrency: int = helpful(8, "requests in flight at once")

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.retries < 0 or self.concurrency < 1:
            raise ValueError("api: max_tokens >= 1, retries >= 0 and concurrency >= 1 required")
        if self.timeout <= 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("api: timeout > 0 and backoff, max_backoff >= 0 required")


@dataclass
class Answer:
    """One prompt's answer (`response`) or why there is none (`error`)."""

    index: int
    prompt: Prompt
    response: str | None = None
    error: str | None = None


@dataclass
class AnswerStats:
    """What gathering did: answers asked for now, reused from the cache, failed, retried."""

    prompts: int = 0
    cached: int = 0
    answered: int = 0
    failed: int = 0
    requests: int = 0
    retries: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class AnswerCache:
    """Append-only JSONL of answers keyed by (teacher, settings, index, prompt); a torn last
    line (a kill mid-write) is ignored. Thread-safe appends, flushed line by line."""

    def __init__(self, path: Path, teacher: dict[str, Any]) -> None:
        self.path = path
        self.teacher = json.dumps(teacher, sort_keys=True)
        self.lock = threading.Lock()
        self.entries: dict[str, dict[str, Any]] = {}
        if path.is_file():
            raw = path.read_bytes()
            if raw and not raw.endswith(b"\n"):  # a kill mid-line: drop the torn tail, so the
                raw = raw[: raw.rfind(b"\n") + 1]  # next append starts a line of its own
                path.write_bytes(raw)
            for line in raw.decode("utf-8", errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                    self.entries[rec["key"]] = rec
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue

    def key(self, index: int, prompt: Prompt) -> str:
        body = json.dumps([self.teacher, index, prompt], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(body.encode("utf-8")).hexdigest()[:32]

    def get(self, index: int, prompt: Prompt) -> dict[str, Any] | None:
        return self.entries.get(self.key(index, prompt))

    def add(self, answer: Answer) -> None:
        rec = {"key": self.key(answer.index, answer.prompt), "index": answer.index}
        rec |= {"response": answer.response} if answer.error is None else {"error": answer.error}
        with self.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.entries[rec["key"]] = rec


def _pending(
    prompts: Sequence[Prompt], cache: AnswerCache, retry_failed: bool, stats: AnswerStats
) -> tuple[list[Answer], list[int]]:
    """(answers so far, indices still to ask) after consulting the cache."""
    out: list[Answer] = []
    todo: list[int] = []
    for i, p in enumerate(prompts):
        hit = cache.get(i, p)
        if hit is not None and ("response" in hit or not retry_failed):
            out.append(Answer(i, p, hit.get("response"), hit.get("error")))
            stats.cached += "response" in hit
        else:
            out.append(Answer(i, p))
            todo.append(i)
    return out, todo


# --- an OpenAI-compatible endpoint -----------------------------------------------------------


class _Fatal(Exception):
    """A reply that no retry can fix for any prompt (bad key, unknown model or URL)."""


def api_messages(prompt: Prompt, system: str) -> list[dict[str, str]]:
    """The chat messages sent for a prompt: messages as they are; plain text as one user turn
    (after the system message, when one is set)."""
    if isinstance(prompt, list):
        return prompt
    head = [{"role": "system", "content": system}] if system else []
    return [*head, {"role": "user", "content": prompt}]


def check_base_url(url: str) -> str:
    """`url` without a trailing slash; UsageError unless it is an http(s)://.../v1 base."""
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--teacher {url}: an API teacher is an http(s)://.../v1 base URL")
    return url.rstrip("/")


def api_answers(
    prompts: Sequence[Prompt],
    settings: ApiSettings,
    base_url: str,
    cache: AnswerCache,
    *,
    retry_failed: bool = True,
    on_answer: Callable[[], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[list[Answer], AnswerStats]:
    """One answer per prompt from `{base_url}/chat/completions`, cached answers reused. The
    key is read from OPENAI_API_KEY (optional: local servers need none)."""
    import httpx

    base = check_base_url(base_url)
    stats = AnswerStats(prompts=len(prompts))
    answers, todo = _pending(prompts, cache, retry_failed, stats)
    if not todo:
        return _count(answers, stats)
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    lock = threading.Lock()
    fatal: list[str] = []

    def ask(client: httpx.Client, i: int) -> Answer:
        body = {
            "model": settings.model,
            "messages": api_messages(prompts[i], settings.system),
            "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
        }
        error = ""
        for attempt in range(settings.retries + 1):
            if fatal:
                return Answer(
                    i, prompts[i], error="not_asked: the endpoint refused an earlier call"
                )
            if attempt:
                with lock:
                    stats.retries += 1
            with lock:
                stats.requests += 1
            wait = min(settings.max_backoff, settings.backoff * 2**attempt)
            try:
                r = client.post(f"{base}/chat/completions", json=body)
            except httpx.TimeoutException:
                error = f"timeout: no reply within {settings.timeout:g}s"
            except httpx.TransportError as e:
                error = f"connection: {type(e).__name__}"
            else:
                if r.status_code == 200:
                    text = _content(r)
                    if text is None:
                        return Answer(
                            i, prompts[i], error="bad_reply: no choices[0].message.content"
                        )
                    return Answer(i, prompts[i], response=text)
                if r.status_code in (401, 403, 404):
                    raise _Fatal(f"HTTP {r.status_code} from {base}/chat/completions: "
                                 f"{_reason(r)}")  # fmt: skip
                error = f"http_{r.status_code}: {_reason(r)}"
                if r.status_code != 429 and r.status_code < 500:
                    return Answer(i, prompts[i], error=error)  # a retry cannot fix it
                after = r.headers.get("retry-after", "")
                if after.replace(".", "", 1).isdigit():
                    wait = min(settings.max_backoff, float(after))
            if attempt < settings.retries:
                sleep(wait)
        return Answer(i, prompts[i], error=f"{error} (after {settings.retries + 1} attempts)")

    timeout = httpx.Timeout(settings.timeout)
    with (
        httpx.Client(timeout=timeout, headers=headers) as client,
        ThreadPoolExecutor(max_workers=settings.concurrency) as pool,
    ):
        futures = [pool.submit(ask, client, i) for i in todo]
        try:
            for fut in as_completed(futures):
                a = fut.result()
                answers[a.index] = a
                cache.add(a)
                if on_answer is not None:
                    on_answer()
        except _Fatal as e:
            fatal.append(str(e))
            for f in futures:
                f.cancel()
            raise UsageError(
                f"--teacher: {e} (check the URL, api.model and OPENAI_API_KEY)"
            ) from None
    return _count(answers, stats)


def _content(r: Any) -> str | None:
    try:
        text = r.json()["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return text if isinstance(text, str) else None


def _reason(r: Any) -> str:
    """A short reason from an error reply (its JSON error message, else its status text)."""
    try:
        msg = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = r.reason_phrase
    return str(msg)[:200]


def _count(answers: list[Answer], stats: AnswerStats) -> tuple[list[Answer], AnswerStats]:
    """Fill in the answered (now, not from the cache) and failed counts and reasons."""
    stats.failed = sum(a.error is not None for a in answers)
    stats.answered = len(answers) - stats.failed - stats.cached
    for a in answers:
        if a.error is not None:
            reason = a.error.split(":", 1)[0]
            stats.reasons[reason] = stats.reasons.get(reason, 0) + 1
    return answers, stats


# --- a JSONL of answers gathered elsewhere ---------------------------------------------------


def read_answer_file(path: Path) -> list[tuple[Prompt, str]]:
    """(prompt, response) of each `{"prompt", "response"}` line of `path`; a malformed line is
    a UsageError naming it (the file is the teacher: it must be whole)."""
    out: list[tuple[Prompt, str]] = []
    try:
        lines = read_bytes(path, what="answers file").decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not valid UTF-8") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError, ValueError):
            raise UsageError(f"{path}:{n}: not valid JSON") from None
        ok = isinstance(rec, dict) and isinstance(rec.get("response"), str)
        prompt = rec.get("prompt") if isinstance(rec, dict) else None
        if not ok or not (isinstance(prompt, str) or _is_messages(prompt)):
            raise UsageError(f'{path}:{n}: expected {{"prompt": str or messages, "response": str}}')
        out.append((prompt, rec["response"]))
    if not out:
        raise UsageError(f"{path}: no answers (the file is empty)")
    return out


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    )


def file_answers(
    prompts: Sequence[Prompt] | None, path: Path
) -> tuple[list[Prompt], list[Answer], AnswerStats]:
    """(prompts, answers, stats) from an answers file: all its records, or (with `prompts`)
    the answer to each prompt given, a prompt it has no answer for counted as failed."""
    records = read_answer_file(path)
    if prompts is None:
        prompts = [p for p, _ in records]
        answers = [Answer(i, p, r) for i, (p, r) in enumerate(records)]
    else:
        table = {json.dumps(p, sort_keys=True): r for p, r in records}
        answers = []
        for i, p in enumerate(prompts):
            r = table.get(json.dumps(p, sort_keys=True))
            answers.append(
                Answer(i, p, r, None if r is not None else "no_answer: not in --teacher")
            )
    return (list(prompts), *_count(answers, AnswerStats(prompts=len(prompts))))


# --- a local checkpoint ----------------------------------------------------------------------


def model_answers(
    prompts: Sequence[Prompt],
    encode: Callable[[Prompt], list[int]],
    generate: Callable[[list[list[int]], int], list[str]],
    cache: AnswerCache,
    *,
    batch_size: int = 8,
    on_answer: Callable[[int], None] | None = None,
) -> tuple[list[Answer], AnswerStats]:
    """One answer per prompt from `generate(token lists, first index) -> texts` (the teacher
    through `rollout.complete`), `batch_size` prompts at a time, cached answers reused."""
    stats = AnswerStats(prompts=len(prompts))
    answers, todo = _pending(prompts, cache, True, stats)
    for b in range(0, len(todo), batch_size):
        group = todo[b : b + batch_size]
        # consecutive indices decode together; a gap (cached answers) starts a new call so
        # that every prompt's sampling seed stays tied to its own index
        runs: list[list[int]] = []
        for i in group:
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        for run in runs:
            texts = generate([encode(prompts[i]) for i in run], run[0])
            for i, text in zip(run, texts, strict=True):
                answers[i] = Answer(i, prompts[i], text)
                cache.add(answers[i])
                stats.requests += 1
            if on_answer is not None:
                on_answer(len(run))
    return _count(answers, stats)
