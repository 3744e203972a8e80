"""Decoding: logits processors, greedy, sampling, beam search, speculative decoding and masked-LM
fill, all over the model's one preallocated KV cache, for left-padded batches of prompts.

Settings are a `GenerationParams` named after Hugging Face `generate`. Token ids in, token ids
(and, given a `decode` function, text) out; nothing here knows the tokenizer.

- Processors run in transformers' order: repetition penalty (HF: divide positive, multiply
  negative logits of every token seen, prompt included), frequency/presence penalties (OpenAI:
  `logit - count * frequency - (count > 0) * presence`, generated tokens only), no-repeat n-gram,
  then, when sampling, temperature, top-k, top-p, min-p.
- Beam search follows transformers' (v4.50+) algorithm step for step: log-softmax, processors on
  the log-probs, top `2 * num_beams` continuations, finished hypotheses scored
  `sum_logprobs / generated_len ** length_penalty`, the same early-stopping heuristic.
- Speculative decoding proposes `draft_k` tokens with a draft model and verifies them in one
  target forward; greedy output equals plain greedy; with sampling it uses the accept/reject
  rule of Leviathan et al. (accept with min(1, p/q), else sample from max(0, p - q)).
- Sampling draws each row with its own generator seeded from (seed, prompt index, sample index),
  so a prompt's samples do not depend on which other prompts share its batch.
- Masked-LM models (`causal=False`) fill `<|mask|>` positions iteratively: one forward per mask,
  each time the still-masked position whose best token is most probable is filled (argmax, or a
  sample from the processed distribution).

Example:
    >>> params = GenerationParams(max_new_tokens=20, do_sample=True, top_p=0.9, seed=0)
    >>> [[c]] = generate(model, [tok.encode("Once").ids], params, stops=Stops(eos_ids={eos}))
    >>> for delta in stream(model, ids, params, stops=stops): print(delta.text, end="")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from llmctl.model.contract import LanguageModel

NEG = -1.0e9  # "impossible" score in beam search, as transformers uses


def _opt(default: Any, help: str) -> Any:
    # model/ imports only torch, so this mirrors config.helpful (help text for --show-config)
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings, named after the parameters of transformers' `generate`."""

    max_new_tokens: int = _opt(64, "Most tokens to generate per completion.")
    do_sample: bool = _opt(False, "Sample (else greedy, or beam search with num_beams > 1).")
    temperature: float = _opt(1.0, "Divide logits by this before sampling.")
    top_k: int = _opt(0, "Sample among the k most likely tokens (0: off).")
    top_p: float = _opt(1.0, "Sample from the smallest set with this much probability (1: off).")
    min_p: float = _opt(0.0, "Drop tokens below min_p * p(most likely token) (0: off).")
    repetition_penalty: float = _opt(1.0, "HF: divide (>0) or multiply (<0) seen tokens' logits.")
    frequency_penalty: float = _opt(0.0, "OpenAI: subtract count * this from generated tokens.")
    presence_penalty: float = _opt(0.0, "OpenAI: subtract this from every generated token.")
    no_repeat_ngram_size: int = _opt(0, "Never repeat an n-gram of this size (0: off).")
    num_beams: int = _opt(1, "Beam search with this many beams (1: off).")
    length_penalty: float = _opt(1.0, "Beam score = sum logprob / length ** this.")
    early_stopping: bool = _opt(False, "Beam search stops once num_beams hypotheses finished.")
    num_return_sequences: int = _opt(1, "Beams returned per prompt (<= num_beams).")
    num_samples: int = _opt(1, "Independent samples per prompt (needs do_sample).")
    seed: int | None = _opt(None, "Sampling seed (default: random, recorded in the output).")
    stop: list[str] = field(
        default_factory=list,
        metadata={"help": "Stop strings: the completion ends before the first one."},
    )
    stop_token_ids: list[int] = field(
        default_factory=list, metadata={"help": "Extra token ids that end a completion."}
    )
    draft_k: int = _opt(4, "Tokens the draft model proposes per speculative step.")
    use_cache: bool = _opt(True, "Use the KV cache (false recomputes the whole prefix each step).")
    cuda_graphs: bool = _opt(
        True, "On CUDA, decode greedy/sampled rows as replayed CUDA graphs (static KV cache)."
    )

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.temperature > 0, "temperature must be > 0 (for greedy, leave do_sample off)"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (
                1 <= self.num_return_sequences <= self.num_beams,
                f"num_return_sequences must be in [1, num_beams={self.num_beams}] "
                "(for several samples use num_samples with do_sample)",
            ),
            (self.num_samples >= 1, "num_samples must be >= 1"),
            (
                self.num_samples == 1 or self.do_sample,
                "num_samples > 1 needs do_sample (greedy and beam give the same text each time)",
            ),
            (not (self.do_sample and self.num_beams > 1), "beam sampling is not supported"),
            (self.draft_k >= 1, "draft_k must be >= 1"),
            (all(s for s in self.stop), "stop strings must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def warps(self) -> bool:
        """Whether temperature/top-k/top-p/min-p change anything (only when sampling)."""
        return self.do_sample and (
            self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0
        )


def decode_dtype(name: str, device: str) -> torch.dtype | None:
    """The dtype to decode in; None keeps the checkpoint's.

    `auto` picks bfloat16 on CUDA and on CPUs whose matmuls run bf16 natively (AVX512-BF16,
    AMX): batch-1 decoding streams every weight once per token, so half the bytes is close to
    twice the speed (bench/generate.py). Elsewhere bf16 would be emulated and slower.
    """
    if name != "auto":
        return getattr(torch, name)
    if device.startswith("cuda"):
        return torch.bfloat16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None


# --- logits processors: [N, V] float logits in, same shape out ---------------------------------


def repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF semantics: the logit of every `seen` token [N, V] is divided by `penalty` when
    positive and multiplied by it when negative (so > 1 always makes it less likely)."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def frequency_presence_penalty(
    logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI semantics: `logit - count * frequency - (count > 0) * presence`, where `counts`
    [N, V] counts each token in the completion so far."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k highest logits per row (and any tied with the k-th), -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their probability reaches `p` (the token that
    crosses it included; at least one). Same arithmetic as transformers' TopPLogitsWarper."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)
    remove[..., -1:] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below `min_p` times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(remove, float("-inf"))


class History:
    """Per-row token history for the history-dependent processors: prompt + generated ids
    (no padding), and tensors that are only built when a setting needs them."""

    def __init__(self, prompts: Sequence[Sequence[int]], params: GenerationParams, vocab: int,
                 device: torch.device) -> None:  # fmt: skip
        self.params, self.vocab, self.device = params, vocab, device
        self.seqs = [list(p) for p in prompts]
        n = len(self.seqs)
        self.seen = self.counts = self.ngrams = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(n, vocab, dtype=torch.bool, device=device)
            for i, p in enumerate(self.seqs):
                self.seen[i, torch.tensor(p, dtype=torch.long, device=device)] = True
        if params.frequency_penalty or params.presence_penalty:
            self.counts = torch.zeros(n, vocab, device=device)
        if params.no_repeat_ngram_size:
            self.ngrams = [self._table(s) for s in self.seqs]

    def _table(self, seq: list[int]) -> dict[tuple[int, ...], set[int]]:
        n, table = self.params.no_repeat_ngram_size, {}
        for i in range(len(seq) - n + 1):
            table.setdefault(tuple(seq[i : i + n - 1]), set()).add(seq[i + n - 1])
        return table

    def append(self, tokens: torch.Tensor | Sequence[int]) -> None:
        """Add one token to every row. A device tensor [N] stays on the device (no host sync)
        unless the n-gram rule needs the ids on the host."""
        if self.seen is not None or self.counts is not None:
            rows = torch.arange(len(tokens), device=self.device)
            cols = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
            if self.seen is not None:
                self.seen[rows, cols] = True
            if self.counts is not None:
                self.counts[rows, cols] += 1
        if isinstance(tokens, torch.Tensor):
            if self.ngrams is None:
                return  # `seqs` only feeds the n-gram tables: skip the host round trip
            tokens = tokens.tolist()
        for seq, t in zip(self.seqs, tokens, strict=True):
            seq.append(t)
        if self.ngrams is not None:
            n = self.params.no_repeat_ngram_size
            for seq, table in zip(self.seqs, self.ngrams, strict=True):
                if len(seq) >= n:
                    table.setdefault(tuple(seq[len(seq) - n : -1]), set()).add(seq[-1])

    def select(self, index: Sequence[int]) -> History:
        """A history whose row i is a copy of row index[i] (beam reordering; cloning)."""
        new = History.__new__(History)
        new.params, new.vocab, new.device = self.params, self.vocab, self.device
        new.seqs = [list(self.seqs[i]) for i in index]
        idx = torch.tensor(list(index), dtype=torch.long, device=self.device)
        new.seen = None if self.seen is None else self.seen.index_select(0, idx)
        new.counts = None if self.counts is None else self.counts.index_select(0, idx)
        new.ngrams = None
        if self.ngrams is not None:
            new.ngrams = [{k: set(v) for k, v in self.ngrams[i].items()} for i in index]
        return new

    def banned(self) -> list[list[int]]:
        """Per row, the tokens that would complete an n-gram already in the sequence."""
        n = self.params.no_repeat_ngram_size
        out = []
        for seq, table in zip(self.seqs, self.ngrams or [], strict=True):
            if len(seq) + 1 < n:
                out.append([])
            else:
                out.append(sorted(table.get(tuple(seq[len(seq) - n + 1 :]), ())))
        return out


def process(logits: torch.Tensor, hist: History, params: GenerationParams, *, warp: bool
            ) -> torch.Tensor:  # fmt: skip
    """Apply every active processor to `logits` [N, V] (float32), in transformers' order.
    `warp` adds temperature/top-k/top-p/min-p (sampling only)."""
    if hist.seen is not None:
        logits = repetition_penalty(logits, hist.seen, params.repetition_penalty)
    if hist.counts is not None:
        logits = frequency_presence_penalty(
            logits, hist.counts, params.frequency_penalty, params.presence_penalty
        )
    if hist.ngrams is not None:
        logits = logits.clone()  # callers may pass views of logits they still use
        for i, banned in enumerate(hist.banned()):
            if banned:
                logits[i, banned] = float("-inf")
    if warp:
        if params.temperature != 1.0:
            logits = logits / params.temperature
        logits = top_k_filter(logits, params.top_k)
        logits = top_p_filter(logits, params.top_p)
        logits = min_p_filter(logits, params.min_p)
    return logits


# --- stopping -----------------------------------------------------------------------------------


@dataclass
class Completion:
    """One generated sequence. `tokens` includes a final stop token; `text` (set when a decode
    function is given) excludes it and is cut before a stop string. `finish_reason` is
    "eos", "stop" (a stop token), "stop_string" or "length"; `score` is the beam score."""

    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    score: float | None = None


@dataclass
class Stops:
    """What ends a completion: `eos_ids` (reason "eos"), other `stop_ids` ("stop"), `strings`
    ("stop_string"; needs `decode`, ids -> text), else `max_new_tokens` ("length")."""

    max_new_tokens: int
    eos_ids: frozenset[int] = frozenset()
    stop_ids: frozenset[int] = frozenset()
    strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None

    def __post_init__(self) -> None:
        if self.strings and self.decode is None:
            raise ValueError("stop strings need a decode function")
        self._longest = max((len(s) for s in self.strings), default=0)

    @property
    def token_ids(self) -> list[int]:
        return sorted(self.eos_ids | self.stop_ids)

    def body(self, c: Completion) -> list[int]:
        """The completion's tokens without a final stop token."""
        if c.finish_reason in ("eos", "stop"):
            return c.tokens[:-1]
        return c.tokens

    def find_string(self, text: str, start: int = 0) -> int:
        """Index of the earliest stop string in `text` at or after `start`, or -1."""
        hits = [i for s in self.strings if (i := text.find(s, start)) >= 0]
        return min(hits) if hits else -1

    def add(self, c: Completion, tokens: Sequence[int]) -> int:
        """Append `tokens` to an unfinished completion until it finishes; returns how many
        were taken (speculative steps may offer more than are needed)."""
        for n, t in enumerate(tokens, start=1):
            c.tokens.append(t)
            if t in self.eos_ids:
                c.finish_reason = "eos"
            elif t in self.stop_ids:
                c.finish_reason = "stop"
            elif self.strings:
                text = self.decode(c.tokens)  # type: ignore[misc]
                at = self.find_string(text, max(0, len(c.text) - self._longest))
                c.text = text
                if at >= 0:
                    c.text, c.finish_reason = text[:at], "stop_string"
            if c.finish_reason is None and len(c.tokens) >= self.max_new_tokens:
                c.finish_reason = "length"
            if c.finish_reason is not None:
                return n
        return len(tokens)

    def finalize(self, c: Completion) -> Completion:
        """Set the final text (if decoding) once a completion is done."""
        if self.decode is not None and c.finish_reason != "stop_string":
            c.text = self.decode(self.body(c))
        return c

    def visible(self, c: Completion) -> str:
        """The text that can be shown now: all of it once finished; else without a trailing
        partial UTF-8 character or anything that may be the start of a stop string."""
        if self.decode is None:
            return ""
        text = c.text if c.finish_reason == "stop_string" else self.decode(self.body(c))
        if c.finish_reason is not None:
            return text
        text = text.rstrip("\ufffd")
        for s in self.strings:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    text = text[:-k]
                    break
        return text


# --- running the model ------------------------------------------------------------------------


def _decode_step(model: LanguageModel, cache: Any, tokens: torch.Tensor,
                 positions: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """One decoding step over a static KV cache (what `_graphed_step` captures)."""
    return model(tokens, position_ids=positions, cache=cache, cache_slots=slot)


_GRAPHED: list[Callable[..., torch.Tensor]] = []


def _graphed_step() -> Callable[..., torch.Tensor]:
    """`_decode_step` compiled into a CUDA graph (torch.compile's "reduce-overhead"): at batch
    1 a small model's decoding is bound by kernel launches, not by memory bandwidth, and a
    replayed graph launches the whole step at once. Compiled once per process."""
    if not _GRAPHED:
        _GRAPHED.append(torch.compile(_decode_step, mode="reduce-overhead", fullgraph=True))
    return _GRAPHED[0]


class Runner:
    """Feeds tokens to a model for N rows of left-padded prompts, keeping the KV cache (or, with
    `use_cache=False`, the whole token history to recompute). Returns float32 logits.

    `static=True` (greedy and sampled decoding on CUDA) keeps the cache in a `StaticKVCache`
    and runs each one-token step as a replayed CUDA graph; same arithmetic, same tokens."""

    def __init__(self, model: LanguageModel, prompts: Sequence[Sequence[int]], extra: int, *,
                 pad_id: int = 0, use_cache: bool = True, static: bool = False
                 ) -> None:  # fmt: skip
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        self.model = model
        device = model.tok_emb.weight.device
        n, width = len(prompts), max(len(p) for p in prompts)
        self.ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
        # one mask buffer for the whole run; sliced per step (True = real token)
        self.mask = torch.ones(n, width + extra, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            self.ids[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
            self.mask[i, : width - len(p)] = False
        # without padding the model takes its fast path (no mask: SDPA's causal kernels)
        self.padded = any(len(p) != width for p in prompts)
        self.static = static and use_cache and getattr(model, "supports_static_cache", False)
        self.cache = (
            model.make_cache(n, width + extra, static=True)
            if self.static
            else model.make_cache(n, width + extra) if use_cache else None
        )  # fmt: skip
        self.length = 0
        if self.static:
            self.step = _graphed_step() if device.type == "cuda" else _decode_step
            if device.type == "cuda":
                for t in self.cache.tensors():  # written in place by every replay
                    torch._dynamo.mark_static_address(t)
            prompt_mask = self.mask[:, :width]
            self.positions = (prompt_mask.long().cumsum(-1) - 1).clamp(min=0)
            self.next_position = prompt_mask.long().sum(-1, keepdim=True)  # [N, 1]

    def _mask(self, length: int) -> torch.Tensor | None:
        return self.mask[:, :length] if self.padded else None

    def prefill(self) -> torch.Tensor:
        """Logits [N, V] after the prompts."""
        width = self.ids.shape[1]
        if self.static:
            slots = torch.arange(width, device=self.ids.device)
            logits = self.model(self.ids, position_ids=self.positions, cache=self.cache,
                                attention_mask=self.mask[:, :width], cache_slots=slots,
                                logits_to_keep=1)  # fmt: skip
        else:
            logits = self.model(
                self.ids, attention_mask=self._mask(width), cache=self.cache, logits_to_keep=1
            )
        self.length = width
        return logits[:, -1].float()

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append `tokens` [N, T]; logits [N, T, V] at those positions."""
        T, end = tokens.shape[1], self.length + tokens.shape[1]
        if self.static:
            if T != 1:
                raise ValueError("a static-cache runner feeds one token per row at a time")
            slot = torch.full((1,), self.length, dtype=torch.long, device=tokens.device)
            logits = self.step(self.model, self.cache, tokens, self.next_position, slot)
            logits = logits.clone()  # a graph's output is overwritten by its next replay
            self.next_position += 1
        elif self.cache is not None:
            logits = self.model(tokens, attention_mask=self._mask(end), cache=self.cache)
        else:
            self.ids = torch.cat([self.ids, tokens], dim=1)
            logits = self.model(self.ids, attention_mask=self._mask(end), logits_to_keep=T)
        self.length = end
        return logits.float()

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes a copy of row index[i] (beam search)."""
        self.mask = self.mask.index_select(0, index)
        self.ids = self.ids.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder(index)

    def crop(self, length: int) -> None:
        """Forget every position from `length` on (speculative rollback)."""
        if self.cache is not None:
            self.cache.crop(length)
        else:
            self.ids = self.ids[:, :length]
        self.length = length


def row_generator(seed: int, prompt_index: int, sample_index: int, device: torch.device
                  ) -> torch.Generator:  # fmt: skip
    """The generator of one (prompt, sample): independent of batching, reproducible."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + prompt_index * 7_919 + sample_index) % (2**63))
    return g


def _choose(scores: torch.Tensor, params: GenerationParams, gens: Sequence[torch.Generator] | None,
            rows: Sequence[int]) -> torch.Tensor:  # fmt: skip
    """The next token of each row [N], on the device: argmax, or for each of `rows` one draw
    from softmax(scores) with its generator (other rows keep the argmax as a placeholder)."""
    out = scores.argmax(dim=-1)
    if params.do_sample:
        probs = scores.softmax(dim=-1)
        for i in rows:
            out[i] = torch.multinomial(probs[i], 1, generator=gens[i])[0]  # type: ignore[index]
    return out


# --- strategies ---------------------------------------------------------------------------------

Step = list[tuple[int, list[int]]]  # (row, tokens added this step) for rows still running


# How many steps the host may run ahead of the tokens it has read, per device type. On CUDA
# the host queues step t + 1 (chosen on the device, fed straight back) before it reads step
# t + 1 - lag's tokens for the stop checks, so the GPU never waits for Python between steps
# (reading every token at once left an H200 idle ~0.5 ms per token at batch 1). The cost: up
# to `lag` steps computed past the last stop, whose tokens are dropped.
READBACK_LAG = {"cuda": 4}


class _Readback:
    """Chosen tokens [N] copied to the host without waiting, read back in order later."""

    def __init__(self, n: int, steps: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.host = torch.empty(steps, n, dtype=torch.long, pin_memory=self.cuda)
        self.events: list[Any] = []
        self.read = 0

    def push(self, tokens: torch.Tensor) -> None:
        self.host[len(self.events)].copy_(tokens, non_blocking=self.cuda)
        event = torch.cuda.Event() if self.cuda else None
        if event is not None:
            event.record()
        self.events.append(event)

    def pending(self) -> int:
        return len(self.events) - self.read

    def pop(self) -> list[int]:
        event = self.events[self.read]
        if event is not None:
            event.synchronize()
        self.read += 1
        return self.host[self.read - 1].tolist()


def _sample_steps(model: LanguageModel, prompts: Sequence[Sequence[int]], params: GenerationParams,
                  stops: Stops, comps: list[Completion], gens: list[torch.Generator] | None,
                  pad_id: int) -> Iterator[Step]:  # fmt: skip
    """Greedy or sampled decoding of all rows at once, one token per row per step (on CUDA
    through a static cache replayed as a CUDA graph, unless `params.cuda_graphs` is off).
    Tokens are chosen and fed back on the device; the host reads them `READBACK_LAG` steps
    later for the stop checks (at once when the n-gram rule needs them on the host)."""
    device = model.tok_emb.weight.device
    static = params.cuda_graphs and device.type == "cuda"
    runner = Runner(model, prompts, params.max_new_tokens, pad_id=pad_id,
                    use_cache=params.use_cache, static=static)  # fmt: skip
    hist = History(prompts, params, model.config.vocab_size, runner.ids.device)
    plain = hist.seen is None and hist.counts is None and hist.ngrams is None and not params.warps
    lag = READBACK_LAG.get(device.type, 0) if hist.ngrams is None else 0
    readback = _Readback(len(prompts), params.max_new_tokens, device)
    logits = runner.prefill()
    active = list(range(len(prompts)))
    for step in range(params.max_new_tokens):
        scores = logits if plain else process(logits, hist, params, warp=params.do_sample)
        nxt = _choose(scores, params, gens, active)
        readback.push(nxt)
        last = step + 1 == params.max_new_tokens
        while readback.pending() > (0 if last else lag):
            tokens = readback.pop()
            for i in active:
                stops.add(comps[i], [tokens[i]])
            yield [(i, [tokens[i]]) for i in active]
            active = [i for i in active if comps[i].finish_reason is None]
            if not active:
                return
        if not last:
            hist.append(nxt)
            logits = runner.feed(nxt[:, None])[:, -1]


def accept_or_resample(p: torch.Tensor, q: torch.Tensor, token: int,
                       gen: torch.Generator | None) -> int | None:  # fmt: skip
    """Speculative sampling's rule for a `token` drawn from the draft's distribution `q`:
    None (accepted) with probability min(1, p/q), else a token drawn from max(0, p - q)
    renormalized. The result is distributed exactly as the target's `p`."""
    u = torch.rand((), generator=gen, device=p.device)
    if u * q[token] < p[token]:
        return None
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    dist = residual / total if total > 0 else p  # p == q up to rounding: any draw from p
    return int(torch.multinomial(dist, 1, generator=gen))


def _speculative_steps(model: LanguageModel, draft: LanguageModel, prompt: Sequence[int],
                       params: GenerationParams, stops: Stops, comp: Completion,
                       gen: torch.Generator | None, pad_id: int) -> Iterator[Step]:  # fmt: skip
    """One row: the draft proposes up to `draft_k` tokens, the target checks them in one forward
    and keeps the longest acceptable prefix plus one token of its own."""
    if draft.config.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"draft vocab_size {draft.config.vocab_size} != model's {model.config.vocab_size}"
        )
    target = Runner(
        model, [prompt], params.max_new_tokens, pad_id=pad_id, use_cache=params.use_cache
    )
    drafter = Runner(
        draft, [prompt], params.max_new_tokens, pad_id=pad_id, use_cache=params.use_cache
    )
    device = target.ids.device
    hist = History([prompt], params, model.config.vocab_size, device)
    warp = params.do_sample

    def dist(logits: torch.Tensor, h: History) -> torch.Tensor:
        scores = process(logits[None], h, params, warp=warp)[0]
        return scores.softmax(-1) if warp else scores

    def pick(d: torch.Tensor) -> int:
        return int(torch.multinomial(d, 1, generator=gen)) if warp else int(d.argmax())

    t_logits, d_logits = target.prefill()[0], drafter.prefill()[0]
    t_pending: list[int] = []  # committed tokens the target has not seen yet
    d_pending: list[int] = []
    while True:
        k = min(params.draft_k, params.max_new_tokens - len(comp.tokens) - 1)
        # 1. draft k tokens
        h, drafts, qs = hist.select([0]), [], []
        for i in range(k):
            if i == 0 and d_pending:
                d_logits = drafter.feed(torch.tensor([d_pending], device=device))[0, -1]
            elif i > 0:
                d_logits = drafter.feed(torch.tensor([[drafts[-1]]], device=device))[0, -1]
            qs.append(dist(d_logits, h))
            drafts.append(pick(qs[-1]))
            h.append([drafts[-1]])
        d_fed = len(d_pending) + k - 1 if k else 0
        # 2. the target scores the pending token and all drafts in one forward
        feed = t_pending + drafts
        out = target.feed(torch.tensor([feed], device=device))[0] if feed else t_logits[None]
        ps = out if t_pending else torch.cat([t_logits[None], out])[: k + 1]
        # 3. accept the longest agreeing prefix, then one token from the target
        h, accepted, token = hist.select([0]), 0, None
        for i in range(k + 1):
            p = dist(ps[i], h)
            if i == k:
                token = pick(p)
            elif not warp:
                if int(p.argmax()) != drafts[i]:
                    token = int(p.argmax())
            else:
                token = accept_or_resample(p, qs[i], drafts[i], gen)
            if token is not None:
                break
            accepted += 1
            h.append([drafts[i]])
        new = [*drafts[:accepted], token]
        taken = stops.add(comp, new)
        yield [(0, new[:taken])]
        if comp.finish_reason is not None:
            return
        for t in new:
            hist.append([t])
        # 4. roll both caches back to the committed tokens
        t_base = target.length - len(feed)
        target.crop(t_base + len(t_pending) + accepted)
        t_pending = [token]
        d_base = drafter.length - d_fed
        if accepted < k:
            drafter.crop(d_base + len(d_pending) + accepted)
            d_pending = [token]
        else:
            d_pending = [drafts[-1], token] if k else [*d_pending, token]


def _beam_search(model: LanguageModel, prompts: Sequence[Sequence[int]], params: GenerationParams,
                 stops: Stops, pad_id: int) -> list[list[Completion]]:  # fmt: skip
    """transformers' beam search (the vectorized v4.50+ version), over our KV cache."""
    B, K, M = len(prompts), params.num_beams, params.max_new_tokens
    runner = Runner(model, prompts, M, pad_id=pad_id, use_cache=params.use_cache)
    device = runner.ids.device
    first = runner.prefill()  # one prefill per prompt, then copy its cache to the K beams
    runner.reorder(torch.arange(B, device=device).repeat_interleave(K))
    logits = first.repeat_interleave(K, dim=0)
    hist = History([p for p in prompts for _ in range(K)], params, model.config.vocab_size, device)
    V = logits.shape[-1]
    stop_ids = torch.tensor(stops.token_ids, dtype=torch.long, device=device)
    keep = max(2, 1 + len(stop_ids)) * K  # enough candidates to continue K beams after stops
    top_k_mask = torch.arange(keep, device=device) < K
    run_seq = torch.full((B, K, M), pad_id, dtype=torch.long, device=device)
    run_scores = torch.zeros(B, K, device=device)
    run_scores[:, 1:] = NEG  # all beams start equal: only the first may expand at step 0
    fin_seq, fin_scores = run_seq.clone(), torch.full((B, K), NEG, device=device)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
    is_fin = torch.zeros(B, K, dtype=torch.bool, device=device)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=device)
    lp = params.length_penalty
    for step in range(M):
        logprobs = process(F.log_softmax(logits, dim=-1), hist, params, warp=False)
        acc = (logprobs.view(B, K, V) + run_scores[:, :, None]).view(B, K * V)
        top_lp, top_idx = torch.topk(acc, keep, dim=-1)
        src, tok = top_idx // V, top_idx % V
        cand = run_seq.gather(1, src[:, :, None].expand(-1, -1, M)).clone()
        cand[:, :, step] = tok
        hits = torch.isin(tok, stop_ids)
        if step == M - 1:
            hits[:] = True
        elif stops.strings:
            for b in range(B):
                for j in range(keep):
                    text = stops.decode(cand[b, j, : step + 1].tolist())  # type: ignore[misc]
                    hits[b, j] |= stops.find_string(text) >= 0
        # the K best candidates that did not just finish keep running
        run_lp = top_lp + hits.float() * NEG
        nxt = torch.topk(run_lp, K, dim=-1).indices
        run_seq = cand.gather(1, nxt[:, :, None].expand(-1, -1, M))
        run_scores = run_lp.gather(1, nxt)
        parent = src.gather(1, nxt)
        # finished candidates among the top K join the finished set if they beat it
        just = hits & top_k_mask[None, :]
        scored = top_lp / ((step + 1) ** lp)
        if params.early_stopping:
            scored = scored + is_fin.all(-1, keepdim=True).float() * NEG
        scored = scored + (~can_improve).float() * NEG + (~just).float() * NEG
        merged = torch.cat([fin_scores, scored], dim=1)
        best = torch.topk(merged, K, dim=-1).indices
        fin_scores = merged.gather(1, best)
        fin_seq = torch.cat([fin_seq, cand], 1).gather(1, best[:, :, None].expand(-1, -1, M))
        fin_len = torch.cat([fin_len, torch.full_like(tok, step + 1)], 1).gather(1, best)
        is_fin = torch.cat([is_fin, just], 1).gather(1, best)
        # stop when no running beam can beat the worst finished one (transformers' heuristic)
        best_running = run_scores[:, :1] / ((step + 1) ** lp)
        worst = torch.where(is_fin, fin_scores.min(1, keepdim=True).values, NEG)
        can_improve = can_improve & (best_running > worst).any(-1, keepdim=True)
        if (
            not can_improve.any()
            or (params.early_stopping and bool(is_fin.all()))
            or bool(hits.all())
        ):
            break
        rows = (parent + torch.arange(B, device=device)[:, None] * K).view(-1)
        runner.reorder(rows)
        hist = hist.select(rows.tolist())
        last = run_seq[:, :, step].reshape(-1)
        hist.append(last.tolist())
        logits = runner.feed(last[:, None])[:, -1]
    results = []
    for b in range(B):
        outs = []
        for r in range(params.num_return_sequences):
            c = Completion(score=float(fin_scores[b, r]))
            stops.add(c, fin_seq[b, r, : int(fin_len[b, r])].tolist())
            c.finish_reason = c.finish_reason or "length"
            outs.append(stops.finalize(c))
        results.append(outs)
    return results


# --- public API ---------------------------------------------------------------------------------


def _check_causal(model: LanguageModel, draft: LanguageModel | None) -> None:
    if getattr(model.config, "head", "lm") != "lm":
        raise ValueError(
            "this is a reward model (a score head, no token logits): it cannot generate"
        )
    if not model.config.causal:
        raise ValueError("this is a masked-LM checkpoint: use fill_masks, not generation")
    if draft is not None and not draft.config.causal:
        raise ValueError("the draft model must be causal")
    for m in (model, draft) if draft is not None else ():
        # speculation crops rejected tokens from the cache; a cache that cannot is refused
        if not getattr(m, "can_rollback", True):
            raise ValueError(f"speculative decoding needs a cache that can roll back; "
                             f"{type(m).__name__}'s recurrent state cannot")  # fmt: skip


def _decode_layout(model: LanguageModel, draft: LanguageModel | None, rows: int) -> None:
    """Store the weights in the layout that decoding `rows` rows at a time reads fastest
    (`use_decode_layout`, e.g. GPT's). Opt-in: generation inside training must leave the
    training weights' layout alone (DDP buckets and fused optimizers hold views of it)."""
    for m in (model, draft):
        if m is not None and hasattr(m, "use_decode_layout"):
            m.use_decode_layout(rows)


@torch.inference_mode()
def generate(
    model: LanguageModel,
    prompts: Sequence[Sequence[int]],
    params: GenerationParams,
    *,
    stops: Stops | None = None,
    draft: LanguageModel | None = None,
    pad_id: int = 0,
    first_index: int = 0,
    decode_layout: bool = False,
) -> list[list[Completion]]:
    """Complete each prompt (token ids): per prompt, `num_samples` completions (greedy or
    sampled) or `num_return_sequences` beams, best first. Prompts of different lengths are
    left-padded into one batch; results equal one-at-a-time generation. `first_index` is the
    index of `prompts[0]` in the whole run, so seeds do not depend on batching.
    `decode_layout` lets the weights be re-laid out for decoding speed (the CLI's choice)."""
    _check_causal(model, draft)
    if decode_layout:
        rows = 1 if draft is not None else len(prompts) * max(params.num_beams, params.num_samples)
        _decode_layout(model, draft, rows)
    stops = stops or Stops(params.max_new_tokens)
    if params.num_beams > 1:
        if draft is not None:
            raise ValueError("speculative decoding does not combine with beam search")
        return _beam_search(model, prompts, params, stops, pad_id)
    S = params.num_samples
    rows = [p for p in prompts for _ in range(S)]
    comps = [Completion() for _ in rows]
    gens = None
    if params.do_sample:
        seed = 0 if params.seed is None else params.seed
        device = model.tok_emb.weight.device
        gens = [row_generator(seed, first_index + i // S, i % S, device) for i in range(len(rows))]
    if draft is not None:
        for i, prompt in enumerate(rows):  # speculation runs one row at a time
            g = None if gens is None else gens[i]
            for _ in _speculative_steps(model, draft, prompt, params, stops, comps[i], g, pad_id):
                pass
    else:
        for _ in _sample_steps(model, rows, params, stops, comps, gens, pad_id):
            pass
    done = [stops.finalize(c) for c in comps]
    return [done[i * S : (i + 1) * S] for i in range(len(prompts))]


@dataclass
class Delta:
    """One streaming step: the new token ids, the newly visible text, the completion so far."""

    tokens: list[int]
    text: str
    completion: Completion


@torch.inference_mode()
def stream(
    model: LanguageModel,
    prompt: Sequence[int],
    params: GenerationParams,
    *,
    stops: Stops | None = None,
    draft: LanguageModel | None = None,
    pad_id: int = 0,
    index: int = 0,
    sample: int = 0,
    decode_layout: bool = False,
) -> Iterator[Delta]:
    """Generate one completion of one prompt, yielding a Delta per step (greedy, sampling or
    speculative; beam search cannot stream). Text deltas hold back a partial UTF-8 character
    and anything that may begin a stop string; their concatenation is the final text."""
    _check_causal(model, draft)
    if params.num_beams > 1:
        raise ValueError("beam search cannot stream: its best sequence is known only at the end")
    if decode_layout:
        _decode_layout(model, draft, 1)
    stops = stops or Stops(params.max_new_tokens)
    comp = Completion()
    gen = None
    if params.do_sample:
        seed = 0 if params.seed is None else params.seed
        gen = row_generator(seed, index, sample, model.tok_emb.weight.device)
    if draft is not None:
        steps = _speculative_steps(model, draft, prompt, params, stops, comp, gen, pad_id)
    else:
        steps = _sample_steps(model, [prompt], params, stops, [comp], [gen] if gen else None,
                              pad_id)  # fmt: skip
    shown = 0
    for step in steps:
        if comp.finish_reason is not None:
            stops.finalize(comp)
        text = stops.visible(comp)
        yield Delta(tokens=step[0][1], text=text[shown:], completion=comp)
        shown = max(shown, len(text))


@torch.inference_mode()
def fill_masks(
    model: LanguageModel,
    ids: Sequence[int],
    mask_id: int,
    params: GenerationParams,
    *,
    banned_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> list[int]:
    """A masked-LM model fills every `mask_id` in `ids`, one position per forward: the masked
    position whose best token is most probable goes first, filled by argmax or (do_sample) a
    draw from the temperature/top-k/top-p/min-p distribution. `banned_ids` (special tokens) are
    never filled in. Returns the filled ids."""
    if model.config.causal:
        raise ValueError("fill_masks needs a masked-LM (causal=False) model")
    x = torch.tensor([list(ids)], dtype=torch.long, device=model.tok_emb.weight.device)
    todo = (x[0] == mask_id).nonzero().flatten().tolist()
    if not todo:
        raise ValueError("the prompt has no mask token to fill")
    hist = History([[]], params, model.config.vocab_size, x.device)  # no history processors
    while todo:
        logits = model(x)[0, todo].float()
        if banned_ids:
            logits[:, list(banned_ids)] = float("-inf")
        scores = process(logits, hist.select([0] * len(todo)), params, warp=params.do_sample)
        probs = scores.softmax(-1)
        j = int(probs.amax(-1).argmax())
        if params.do_sample:
            token = int(torch.multinomial(probs[j], 1, generator=generator))
        else:
            token = int(probs[j].argmax())
        x[0, todo.pop(j)] = token
    return x[0].tolist()
