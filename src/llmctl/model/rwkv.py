"""RWKV-4: a recurrent language model trained in parallel like a transformer.

The architecture and initialization of RWKV-4 ("Eagle"-era v4, the formulation of Peng et al.
2023, "RWKV: Reinventing RNNs for the Transformer Era", arXiv:2305.13048, and BlinkDL's
reference code RWKV-LM/RWKV-v4neo): each block is

    x = x + TimeMix(LN1(x))      token shift, r/k/v projections, the WKV recurrence
    x = x + ChannelMix(LN2(x))   token shift, sigmoid(r) * W_v relu(W_k x)^2

with LN0 after the embedding. WKV, per channel c, with decay w = exp(time_decay) > 0 and
bonus u = time_first:

    wkv_t = (sum_{i<t} e^{-(t-1-i)w + k_i} v_i + e^{u + k_t} v_t)
          / (sum_{i<t} e^{-(t-1-i)w + k_i}     + e^{u + k_t})

Training computes it for the whole sequence at once (`wkv_chunked`): the recurrence
s_t = e^-w s_{t-1} + e^{k_t} v_t is linear, so its segments combine associatively, and a
parallel prefix scan (log2(T) steps over all positions) gives every s_t; each segment is held
in log space (a, b, p: numerator and denominator scaled by e^-p) and every combination
subtracts the larger exponent first, as the official CUDA kernels do with their running
maximum, so nothing overflows in fp32 or bf16. Long inputs are scanned in chunks that hand
the state on. The WKV
runs in float32 whatever the model's dtype (as the official bf16 kernel does internally).
Generation feeds the same state one token at a time (`RWKVState`, a fixed size per layer:
the last LN1/LN2 outputs for the token shift and a, b, p), so memory and cost per token do not
grow with the context. Speculative decoding's rollback restores the state before one of the
last forward calls and feeds the accepted tokens again (`RWKVState.crop`).

Example:
    >>> model = RWKV(rwkv_preset("rwkv-tiny", vocab_size=100))
    >>> logits = model(torch.randint(0, 100, (2, 16)))  # [2, 16, 100]
    >>> state = model.make_cache(2, 64); model(ids, cache=state)  # then one token at a time

Only torch is imported here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmctl.model.gpt import relayout_linears, token_loss

_FIELD_TYPES = {"int": int, "float": float, "bool": bool}
# A "minus infinity" that stays finite: exp(NEG - finite) == 0 and NEG - NEG == 0 (no NaN).
NEG = -1.0e30


@dataclass(frozen=True)
class RWKVConfig:
    """Architecture of an RWKV-4 model. `d_ff=None` means 4 * d_model (the paper's ratio).
    `max_seq_len` is the training context (the recurrent form itself has no limit);
    `chunk_size` is the WKV scan length of the parallel form (a speed/memory trade-off, not
    a change of the result). Example: `RWKVConfig(vocab_size=256, n_layer=2, d_model=64)`."""

    vocab_size: int
    n_layer: int
    d_model: int
    d_ff: int | None = None
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    chunk_size: int = 32

    # Fixed facts the commands ask every model config about.
    causal = True
    head = "lm"

    def __post_init__(self) -> None:
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _FIELD_TYPES[str(f.type).split(" ")[0]]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(
                    f"RWKVConfig.{f.name} must be {kind.__name__}, got {type(value).__name__} "
                    f"{value!r}"
                )
        for name in ("vocab_size", "n_layer", "d_model", "d_ff", "max_seq_len", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"RWKVConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.norm_eps <= 0:
            raise ValueError("RWKVConfig.norm_eps must be > 0")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field (d_ff resolved)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RWKVConfig:
        """Inverse of `to_dict`; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"RWKVConfig: unknown key(s) {', '.join(unknown)}")
        return cls(**d)


# Sized against GPT's `tiny` / `small` (model/gpt.py): the same weight-matrix parameters per
# layer (time mixing 4·d² = attention; channel mixing 2·d·d_ff + d² = the SwiGLU MLP), and an
# untied head (the paper's) that matches the GPT's tied embedding-as-head, so `num_params()`
# (non-embedding) is equal. vocab_size is a placeholder: training sets the tokenizer's.
PRESETS: dict[str, dict[str, Any]] = {
    "rwkv-tiny": dict(vocab_size=256, n_layer=2, d_model=64, d_ff=224, max_seq_len=64),
    "rwkv-small": dict(vocab_size=8192, n_layer=6, d_model=384, d_ff=1344, max_seq_len=256),
}


def preset(name: str, **overrides: Any) -> RWKVConfig:
    """A named RWKV preset with fields overridden, e.g. `preset("rwkv-small", vocab_size=V)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown RWKV preset {name!r}; known: {', '.join(PRESETS)}")
    return RWKVConfig.from_dict({**PRESETS[name], **overrides})


# --- the WKV operator ---------------------------------------------------------------------------

WKVState = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (a, b, p), each [B, C] float32


def wkv_empty(batch: int, channels: int, device: torch.device | str | None) -> WKVState:
    """The state before any token: nothing summed, p = -inf (finite stand-in)."""
    zeros = torch.zeros(batch, channels, device=device, dtype=torch.float32)
    return zeros, zeros.clone(), torch.full_like(zeros, NEG)


def _combine(
    left: WKVState,
    right: WKVState,
    decay: torch.Tensor | float,
    cut: torch.Tensor | None = None,
) -> WKVState:
    """The state of two adjacent segments: `left` decayed by `decay` (= its distance · w) plus
    `right`, rescaled to their larger exponent so no exponential exceeds 1. Where `cut` (bool,
    broadcast) is True a document starts inside `right`: `left` is dropped (packed rows)."""
    pl = left[2] - decay
    if cut is not None:
        pl = pl.masked_fill(cut, NEG)
    p = torch.maximum(pl, right[2])
    el, er = torch.exp(pl - p), torch.exp(right[2] - p)
    if cut is not None:  # exp(NEG - NEG) would be 1: zero the dropped side explicitly
        el = el.masked_fill(cut, 0.0)
    return left[0] * el + right[0] * er, left[1] * el + right[1] * er, p


def wkv_chunked(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: WKVState,
    chunk: int,
    starts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, WKVState]:
    """WKV of `k`, `v` [B, T, C] (float32) after `state`, with decay `w` = exp(time_decay)
    and bonus `u` [C]; returns (wkv [B, T, C], the state after the last token). `starts`
    [B, T] (bool) marks tokens that begin a new document of a packed row: the state is
    empty before them (a segmented scan: a flag per segment says "a start lies inside",
    and a combination drops whatever lies left of a start).

    Each chunk of `chunk` tokens is one parallel prefix scan (Hillis-Steele, log2(chunk) steps
    over all positions at once) of the recurrence s_t = e^-w s_{t-1} + e^{k_t} v_t, whose
    segments combine associatively in log space (`_combine`: a running maximum, as the
    official kernels keep). The state carried in enters each position decayed by its
    distance; the chunks hand their end state on. A key of NEG (padding) adds exactly zero."""
    outs = []
    for s in range(0, k.shape[1], chunk):
        kc, vc = k[:, s : s + chunk], v[:, s : s + chunk]
        L = kc.shape[1]
        first = f = None if starts is None else starts[:, s : s + chunk, None]
        # inclusive scan: position t holds the sum over the chunk's tokens 0..t
        a, b, p = vc, torch.ones_like(vc), kc
        off = 1
        while off < L:
            cut = None if f is None else f[:, off:]
            na, nb, np_ = _combine((a[:, :-off], b[:, :-off], p[:, :-off]),
                                   (a[:, off:], b[:, off:], p[:, off:]), off * w, cut)  # fmt: skip
            a = torch.cat([a[:, :off], na], 1)
            b = torch.cat([b[:, :off], nb], 1)
            p = torch.cat([p[:, :off], np_], 1)
            if f is not None:
                f = torch.cat([f[:, :off], f[:, :-off] | f[:, off:]], 1)
            off *= 2
        # the carried-in state, decayed to each position, joins every prefix (up to a start)
        t = torch.arange(1, L + 1, device=k.device, dtype=torch.float32)[None, :, None]
        start = tuple(x[:, None] for x in state)
        a, b, p = _combine(start, (a, b, p), t * w, f)  # type: ignore[arg-type]
        # output t reads the state before it (tokens < t) plus the current token's bonus
        before = tuple(
            torch.cat([x[:, None], y[:, :-1]], 1) for x, y in zip(state, (a, b, p), strict=True)
        )
        na, nb, _ = _combine(before, (vc, torch.ones_like(vc), u + kc), 0.0, first)  # type: ignore[arg-type]
        outs.append(na / nb)
        state = (a[:, -1], b[:, -1], p[:, -1])
    return torch.cat(outs, dim=1), state


def wkv_step(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: WKVState
) -> tuple[torch.Tensor, WKVState]:
    """One token of WKV, `k`, `v` [B, C] float32: the recurrent form of the official kernel."""
    a, b, p = state
    ww = u + k
    q = torch.maximum(p, ww)
    e1, e2 = torch.exp(p - q), torch.exp(ww - q)
    out = (e1 * a + e2 * v) / (e1 * b + e2)
    ww = p - w
    q = torch.maximum(ww, k)
    e1, e2 = torch.exp(ww - q), torch.exp(k - q)
    return out, (e1 * a + e2 * v, e1 * b + e2, q)


# --- the recurrent state ------------------------------------------------------------------------


class RWKVState:
    """Per layer, a fixed-size state: the last LN1 and LN2 outputs (token shift, [B, C] in the
    model's dtype) and the WKV state (a, b, p, [B, C] float32). `length` counts the tokens fed.
    Nothing grows with the context; `reorder` selects rows (beams). Build one with
    `RWKV.make_cache`.

    `crop(n)` (speculative decoding's rollback) works within the last `KEEP` forward calls:
    every call keeps a reference to the state before it (the state's tensors are replaced,
    never written in place, so this costs no copy) and its input tokens; cropping restores
    the state before the call that holds position n and feeds that call's first tokens again
    (at most the speculation's draft_k + 1)."""

    can_rollback = True
    KEEP = 32

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        d_model: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        model: nn.Module | None = None,
    ) -> None:
        zeros = torch.zeros(batch_size, d_model, device=device, dtype=dtype)
        self.att_x = [zeros.clone() for _ in range(n_layer)]
        self.ffn_x = [zeros.clone() for _ in range(n_layer)]
        self.wkv = [wkv_empty(batch_size, d_model, device) for _ in range(n_layer)]
        self.length = 0
        self.model = model
        # (length, att_x, ffn_x, wkv, tokens [B, T], their mask [B, T] or None) per call
        self._calls: list[tuple[int, list, list, list, torch.Tensor, torch.Tensor | None]] = []

    @property
    def batch_size(self) -> int:
        return self.att_x[0].shape[0]

    def remember(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Called by `RWKV.forward` before it advances the state by `tokens`."""
        self._calls.append(
            (self.length, list(self.att_x), list(self.ffn_x), list(self.wkv), tokens, mask)
        )
        del self._calls[: -self.KEEP]

    def reorder(self, index: torch.LongTensor) -> None:
        """Select batch rows in place (beam search). `index` may repeat rows or change B.
        Earlier states are forgotten: after a reorder only `crop(length)` is possible."""
        self.att_x = [t.index_select(0, index) for t in self.att_x]
        self.ffn_x = [t.index_select(0, index) for t in self.ffn_x]
        self.wkv = [tuple(t.index_select(0, index) for t in s) for s in self.wkv]  # type: ignore[misc]
        self._calls.clear()

    def crop(self, length: int) -> None:
        """Forget every token from `length` on (see the class docstring for how far back)."""
        if length == self.length:
            return
        call = next((c for c in reversed(self._calls) if c[0] <= length), None)
        if not 0 <= length < self.length or call is None or self.model is None:
            raise ValueError(
                f"RWKVState.crop: cannot roll back from {self.length} to {length} tokens "
                f"(the state remembers the last {len(self._calls)} forward calls)"
            )
        start, att_x, ffn_x, wkv, tokens, mask = call
        del self._calls[self._calls.index(call) :]
        self.att_x, self.ffn_x, self.wkv = list(att_x), list(ffn_x), list(wkv)
        self.length = start
        if length > start:  # the call held position `length`: feed its first tokens again
            n = length - start
            full = None
            if mask is not None:
                past = torch.ones(mask.shape[0], start, dtype=torch.bool, device=mask.device)
                full = torch.cat([past, mask[:, :n]], 1)
            self.model(tokens[:, :n], attention_mask=full, cache=self, logits_to_keep=1)


# --- the model ----------------------------------------------------------------------------------


def _shift(
    x: torch.Tensor, last: torch.Tensor | None, starts: torch.Tensor | None = None
) -> torch.Tensor:
    """Token shift: x_{t-1} for every t, with `last` (or zeros) before the first; zeros
    before a token that `starts` [B, T] marks as a document's first (packed rows)."""
    first = torch.zeros_like(x[:, :1]) if last is None else last[:, None].to(x.dtype)
    xx = torch.cat([first, x[:, :-1]], dim=1)
    return xx if starts is None else xx.masked_fill(starts[:, :, None], 0.0)


def _ddd(d: int) -> torch.Tensor:
    return torch.arange(d, dtype=torch.float32) / d  # 0 .. (d-1)/d across channels


class TimeMix(nn.Module):
    """RWKV-4 time mixing: sigmoid(r) * WKV(k, v), projected back (`key`, `value`,
    `receptance`, `output`: plain nn.Linear so LoRA and quantization can swap them)."""

    def __init__(self, cfg: RWKVConfig, layer: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.chunk = cfg.chunk_size
        self.time_decay = nn.Parameter(torch.empty(d))
        self.time_first = nn.Parameter(torch.empty(d))
        self.time_mix_k = nn.Parameter(torch.empty(d))
        self.time_mix_v = nn.Parameter(torch.empty(d))
        self.time_mix_r = nn.Parameter(torch.empty(d))
        self.key = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(d, d, bias=False)
        self.receptance = nn.Linear(d, d, bias=False)
        self.output = nn.Linear(d, d, bias=False)
        self.layer, self.n_layer = layer, cfg.n_layer

    @torch.no_grad()
    def init_special(self) -> None:
        """RWKV-v4neo's "fancy" init: decay speeds from -5 to 3 across channels (slower in lower
        layers), a zigzag bonus around log(0.3), mixes that lean on the previous token more in
        lower channels and deeper layers."""
        d = self.time_decay.numel()
        r01 = self.layer / max(self.n_layer - 1, 1)  # 0 → 1 with depth
        r10 = 1.0 - self.layer / self.n_layer  # 1 → ~0 with depth
        h = torch.arange(d, dtype=torch.float32) / max(d - 1, 1)
        self.time_decay.copy_(-5 + 8 * h ** (0.7 + 1.3 * r01))
        zigzag = (torch.tensor([(i + 1) % 3 - 1 for i in range(d)], dtype=torch.float32)) * 0.5
        self.time_first.copy_(math.log(0.3) + zigzag)
        ddd = _ddd(d)
        self.time_mix_k.copy_(ddd**r10)
        self.time_mix_v.copy_(ddd**r10 + 0.3 * r01)
        self.time_mix_r.copy_(ddd ** (0.5 * r10))

    def forward(
        self,
        x: torch.Tensor,
        pad: torch.Tensor | None,
        state: RWKVState | None,
        starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        last = state.att_x[self.layer] if state is not None else None
        xx = _shift(x, last, starts)
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xv = x * self.time_mix_v + xx * (1 - self.time_mix_v)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        k, v = self.key(xk).float(), self.value(xv).float()
        r = self.receptance(xr)
        if pad is not None:  # a padding token adds nothing to the state
            k = k.masked_fill(pad[:, :, None], NEG)
        w, u = torch.exp(self.time_decay.float()), self.time_first.float()
        prev = state.wkv[self.layer] if state is not None else wkv_empty(*x.shape[::2], x.device)
        if x.shape[1] == 1:
            y, new = wkv_step(w, u, k[:, 0], v[:, 0], prev)
            y = y[:, None]
        else:
            y, new = wkv_chunked(w, u, k, v, prev, self.chunk, starts)
        if state is not None:
            state.wkv[self.layer] = new
            state.att_x[self.layer] = x[:, -1]
        return self.output(torch.sigmoid(r) * y.to(r.dtype))


class ChannelMix(nn.Module):
    """RWKV-4 channel mixing: sigmoid(receptance(xr)) * value(relu(key(xk))^2)."""

    def __init__(self, cfg: RWKVConfig, layer: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.time_mix_k = nn.Parameter(torch.empty(d))
        self.time_mix_r = nn.Parameter(torch.empty(d))
        self.key = nn.Linear(d, cfg.d_ff, bias=False)  # type: ignore[arg-type]
        self.receptance = nn.Linear(d, d, bias=False)
        self.value = nn.Linear(cfg.d_ff, d, bias=False)  # type: ignore[arg-type]
        self.layer, self.n_layer = layer, cfg.n_layer

    @torch.no_grad()
    def init_special(self) -> None:
        r10 = 1.0 - self.layer / self.n_layer
        ddd = _ddd(self.time_mix_k.numel())
        self.time_mix_k.copy_(ddd**r10)
        self.time_mix_r.copy_(ddd**r10)

    def forward(
        self, x: torch.Tensor, state: RWKVState | None, starts: torch.Tensor | None = None
    ) -> torch.Tensor:
        last = state.ffn_x[self.layer] if state is not None else None
        xx = _shift(x, last, starts)
        xk = x * self.time_mix_k + xx * (1 - self.time_mix_k)
        xr = x * self.time_mix_r + xx * (1 - self.time_mix_r)
        if state is not None:
            state.ffn_x[self.layer] = x[:, -1]
        k = torch.square(torch.relu(self.key(xk)))
        return torch.sigmoid(self.receptance(xr)) * self.value(k)


class Block(nn.Module):
    """x + att(ln1(x)), then x + ffn(ln2(x)); LN0 on the embeddings lives in block 0."""

    def __init__(self, cfg: RWKVConfig, layer: int) -> None:
        super().__init__()
        if layer == 0:
            self.ln0 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.att = TimeMix(cfg, layer)
        self.ffn = ChannelMix(cfg, layer)

    def forward(
        self,
        x: torch.Tensor,
        pad: torch.Tensor | None,
        state: RWKVState | None,
        starts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if hasattr(self, "ln0"):
            x = self.ln0(x)
        h = self.ln1(x)
        if pad is not None:  # a padding position is no previous token for the token shift
            h = h.masked_fill(pad[:, :, None], 0.0)
        x = x + self.att(h, pad, state, starts)
        h = self.ln2(x)
        if pad is not None:
            h = h.masked_fill(pad[:, :, None], 0.0)
        return x + self.ffn(h, state, starts)


class RWKV(nn.Module):
    """Embedding → `n_layer` RWKV-4 blocks → LayerNorm → lm head; the contract of `GPT`.

    Parameter names: `tok_emb`, `blocks.{i}.{ln0 (block 0), ln1, ln2, att, ffn}`, `norm_f`,
    `lm_head`; `att.{key,value,receptance,output}` and `ffn.{key,value,receptance}` are plain
    nn.Linear. `aux` holds an objective's trainable extras (never saved). `gradient_checkpointing
    = True` recomputes each block in the backward pass while training.
    """

    can_rollback = RWKVState.can_rollback
    # LoRA targets by group (model/contract.py): time mixing is "attn", channel mixing "mlp"
    lora_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "attn": ("att.key", "att.value", "att.receptance", "att.output"),
        "mlp": ("ffn.key", "ffn.value", "ffn.receptance"),
    }

    def __init__(self, config: RWKVConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = nn.LayerNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.aux = nn.ModuleDict()
        self._init_weights()
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the token embedding with the lm head when the config ties them."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    @torch.no_grad()
    def _init_weights(self) -> None:
        # RWKV-v4neo's generate_init_weight: a tiny uniform embedding (with LN0 after it, the
        # paper's "small init embedding"); the projections that read the residual stream into
        # r/k and write back (att.key/receptance/output, ffn.receptance/value) start at zero;
        # the others orthogonal with gain sqrt(out/in) when they widen; the head orthogonal
        # × 0.5 · sqrt(V/d). The per-channel time parameters get the "fancy" init.
        if self.tok_emb.weight.device.type == "meta":
            return  # load_model assigns every tensor
        nn.init.uniform_(self.tok_emb.weight, -1e-4, 1e-4)
        cfg = self.config
        for block in self.blocks:
            block.att.init_special()
            block.ffn.init_special()
            for lin in (block.att.key, block.att.receptance, block.att.output):
                nn.init.zeros_(lin.weight)
            for lin in (block.ffn.receptance, block.ffn.value):
                nn.init.zeros_(lin.weight)
            for lin in (block.att.value, block.ffn.key):
                out, inp = lin.weight.shape
                nn.init.orthogonal_(lin.weight, gain=math.sqrt(out / inp) if out > inp else 1.0)
        if not cfg.tie_embeddings:
            ratio = cfg.vocab_size / cfg.d_model
            gain = 0.5 * (math.sqrt(ratio) if ratio > 1 else 1.0)
            nn.init.orthogonal_(self.lm_head.weight, gain=gain)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once). `non_embedding` drops the token embedding unless
        it doubles as the lm head (an untied head counts: it is a matmul per token)."""
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("aux."))
        if non_embedding and not self.config.tie_embeddings:
            n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), for MFU: 6N for the weights plus the
        chunked WKV, ~3 · 6 · chunk FLOPs per channel and layer (no term grows with seq_len
        beyond the chunk)."""
        cfg = self.config
        chunk = min(cfg.chunk_size, seq_len)
        return 6 * self.num_params(non_embedding=True) + 18 * cfg.n_layer * cfg.d_model * chunk

    def make_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> RWKVState:
        """An empty recurrent state for `batch_size` rows; its size does not depend on
        `max_len` (kept for the GPT contract). Device and dtype default to the model's."""
        weight = self.tok_emb.weight
        return RWKVState(
            self.config.n_layer,
            batch_size,
            self.config.d_model,
            device=weight.device if device is None else device,
            dtype=weight.dtype if dtype is None else dtype,
            model=self,
        )

    def use_decode_layout(self, batch_size: int) -> None:
        """Lay the Linear weights out for decoding `batch_size` rows (see GPT's)."""
        relayout_linears(self, batch_size)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: RWKVState | None = None,
        return_hidden: bool = False,
        hidden_layers: tuple[int, ...] | list[int] = (),
        logits_to_keep: int = 0,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Logits [B, T, V] for tokens `idx` [B, T]; the arguments mean what they mean for
        `GPT.forward` (`labels` returns the summed loss and its count instead of logits).
        `attention_mask` [B, S] (S = cache.length + T) marks real tokens True: padding (left,
        as generation pads) neither enters the WKV state nor serves as the previous token of
        a token shift. `position_ids` are accepted and unused (an RNN knows
        order from the recurrence). With `cache`, the state advances past the T tokens.
        `segment_ids` [B, T] (no cache) packs documents in a row: where the id changes, the
        WKV state and the token shift start empty again, as if the document began a row."""
        B, T = idx.shape
        starts = None
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids (packed rows) cannot be used with a cache")
            if segment_ids.shape != (B, T):
                raise ValueError(
                    f"segment_ids must be [B, T] = [{B}, {T}], got {list(segment_ids.shape)}"
                )
            starts = torch.zeros_like(segment_ids, dtype=torch.bool)
            starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
        past = 0
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache holds {cache.batch_size} rows but idx has {B}")
            past = cache.length
        if position_ids is not None and position_ids.shape != (B, T):
            raise ValueError(
                f"position_ids must be [B, T] = [{B}, {T}], got {list(position_ids.shape)}"
            )
        pad = None
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(
                    f"attention_mask must be [B, S] = [{B}, {past + T}], "
                    f"got {list(attention_mask.shape)}"
                )
            pad = ~attention_mask[:, past:].bool()
            if not pad.any():
                pad = None
        if cache is not None:
            cache.remember(idx, None if pad is None else ~pad)
        if return_hidden and hidden_layers:
            raise ValueError("ask for return_hidden or hidden_layers, not both")
        for i in hidden_layers:
            if not 0 <= i <= self.config.n_layer:
                raise ValueError(f"hidden_layers: {i} is not in 0..{self.config.n_layer}")

        x = self.tok_emb(idx)
        states = {0: x} if 0 in hidden_layers else {}
        checkpointing = self.gradient_checkpointing and self.training and cache is None
        for layer, block in enumerate(self.blocks):
            if checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, pad, None, starts, use_reentrant=False)
            else:
                x = block(x, pad, cache, starts)
            if layer + 1 in hidden_layers:
                states[layer + 1] = x
        if cache is not None:
            cache.length = past + T
        hidden = self.norm_f(x)
        logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden)
        if labels is not None:
            return token_loss(logits, labels)
        if hidden_layers:
            return logits, [states[i] for i in hidden_layers]
        return (logits, hidden) if return_hidden else logits


__all__ = ["PRESETS", "RWKV", "RWKVConfig", "RWKVState", "preset", "wkv_chunked", "wkv_step"]
