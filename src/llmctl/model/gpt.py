"""The transformer: config and presets, attention (SDPA, GQA/MQA), MLP, norms, positions, KV cache.

One decoder-style stack serves every objective: `causal=True` for language models,
`causal=False` for masked-LM encoders. Position schemes: learned or sinusoidal absolute
embeddings, RoPE (Llama's rotate-half layout, so weights map 1:1 onto transformers' Llama),
ALiBi, and a T5-style bucketed relative bias (one learned table shared by all layers, as in T5).

Example:
    >>> cfg = preset("tiny", vocab_size=100)
    >>> model = GPT(cfg)
    >>> logits = model(torch.randint(0, 100, (2, 16)))  # [2, 16, 100]

Only torch is imported here, so every other part of llmctl can build a model cheaply.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "relative")
HEADS = ("lm", "score")
_FIELD_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


@dataclass(frozen=True)
class GPTConfig:
    """Architecture of a GPT. `n_kv_head=None` means n_head (plain multi-head attention);
    `d_ff=None` means 4 * d_model. `rel_buckets` and `rel_max_distance` only matter for
    `pos="relative"`. `head="score"` replaces the lm head by a scalar `score` head [1, d]
    (a reward model, as transformers' *ForSequenceClassification with one label).
    Example: `GPTConfig(vocab_size=256, n_layer=2, n_head=4, d_model=64)`."""

    vocab_size: int
    n_layer: int
    n_head: int
    d_model: int
    n_kv_head: int | None = None
    d_ff: int | None = None
    max_seq_len: int = 1024
    norm: str = "rmsnorm"
    mlp: str = "swiglu"
    pos: str = "rope"
    causal: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    bias: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    rel_buckets: int = 32
    rel_max_distance: int = 128
    head: str = "lm"

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * self.d_model)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind = _FIELD_TYPES[str(f.type).split(" ")[0]]  # "int | None" -> int
            # JSON and TOML write 1.0 as 1; accept an int for a float field, never a bool.
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(
                    f"GPTConfig.{f.name} must be {kind.__name__}, got {type(value).__name__} "
                    f"{value!r}"
                )
        self._validate()

    def _validate(self) -> None:
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_seq_len < 1:
            raise ValueError(f"GPTConfig.max_seq_len must be >= 1, got {self.max_seq_len}")
        checks = (("norm", NORMS), ("mlp", MLPS), ("pos", POSITIONS), ("head", HEADS))
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"GPTConfig.{name} must be one of {', '.join(allowed)}; "
                    f"got {getattr(self, name)!r}"
                )
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig: n_head={self.n_head} must divide d_model={self.d_model}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"GPTConfig: n_kv_head={self.n_kv_head} must divide n_head={self.n_head}"
            )
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"GPTConfig: rope needs an even head dim, got {self.head_dim}")
        if self.pos == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"GPTConfig: sinusoidal needs an even d_model, got {self.d_model}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError("GPTConfig: rope_theta and norm_eps must be > 0")
        if self.rel_buckets < 4 or self.rel_max_distance <= self.rel_buckets // 2:
            raise ValueError(
                "GPTConfig: relative bias needs rel_buckets >= 4 and "
                f"rel_max_distance > rel_buckets // 2; got {self.rel_buckets}, "
                f"{self.rel_max_distance}"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field (n_kv_head and d_ff resolved)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Inverse of `to_dict`; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown key(s) {', '.join(unknown)}")
        return cls(**d)


# vocab_size in a preset is a placeholder: training overrides it with the tokenizer's size.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and CI: a few hundred thousand parameters.
    "tiny": dict(
        vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=192,
        max_seq_len=64, norm="rmsnorm", mlp="swiglu", pos="rope",
    ),
    # ≈10.6M non-embedding parameters; trains on one GPU in minutes.
    "small": dict(
        vocab_size=8192, n_layer=6, n_head=6, d_model=384, d_ff=1024,
        max_seq_len=256, norm="rmsnorm", mlp="swiglu", pos="rope",
    ),
    # About a quarter of small's parameters (3.3M of 13.8M with an 8K vocabulary; 1.8M
    # non-embedding): the student that `distill` benchmarks against a small teacher.
    "mini": dict(
        vocab_size=8192, n_layer=4, n_head=6, d_model=192, d_ff=512,
        max_seq_len=256, norm="rmsnorm", mlp="swiglu", pos="rope",
    ),
    # GPT-2 small, weight-compatible with transformers' GPT2LMHeadModel (see model/hf.py).
    "gpt2-124m": dict(
        vocab_size=50257, n_layer=12, n_head=12, d_model=768, d_ff=3072,
        max_seq_len=1024, norm="layernorm", mlp="gelu", pos="learned", bias=True,
        tie_embeddings=True,
    ),
    # The same budget with Llama's choices (RoPE, RMSNorm, SwiGLU, GQA); maps onto LlamaForCausalLM.
    "llama-style": dict(
        vocab_size=32000, n_layer=12, n_head=12, n_kv_head=4, d_model=768, d_ff=2048,
        max_seq_len=1024, norm="rmsnorm", mlp="swiglu", pos="rope", tie_embeddings=False,
    ),
}  # fmt: skip


def preset(name: str, **overrides: Any) -> GPTConfig:
    """A named preset with fields overridden, e.g. `preset("small", vocab_size=tok.vocab_size)`."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return GPTConfig.from_dict({**PRESETS[name], **overrides})


class KVCache:
    """Preallocated keys/values per layer, [B, n_kv_head, max_len, head_dim] each, plus the
    true position of every cached slot (relative and ALiBi biases need it under left padding).

    `length` slots are filled; a forward call with `cache=` writes its T new slots at `length`
    and advances it. Build one with `GPT.make_cache`.
    """

    can_rollback = True

    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_kv_head: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def max_len(self) -> int:
        return self.positions.shape[1]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, H_kv, T, D] at `length`; return all filled slots including them."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.LongTensor) -> None:
        """Select batch rows in place (beam search). `index` may repeat rows or change B."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]
        self.positions = self.positions.index_select(0, index)

    def crop(self, length: int) -> None:
        """Forget every slot from `length` on (speculative-decoding rollback)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"KVCache.crop: length must be in [0, {self.length}], got {length}")
        self.length = length


class StaticKVCache(KVCache):
    """A KV cache whose shapes never change, so that a decoding step can be captured once as
    a CUDA graph and replayed (`sample.Runner`). A forward call names the slots it
    writes with `cache_slots` (a device tensor [T]) instead of appending at a Python length;
    attention always reads all `max_len` slots, under `key_mask` [B, max_len] (True = a real,
    written token) and causality by slot. Beams and speculative rollback use `KVCache`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_mask = torch.zeros(
            self.batch_size, self.max_len, dtype=torch.bool, device=self.positions.device
        )
        self.slots: torch.Tensor | None = None  # the slots of the forward call in progress

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer a forward call writes in place (static addresses for CUDA graphs)."""
        return [*self.k, *self.v, self.positions, self.key_mask]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.slots is not None
        self.k[layer].index_copy_(2, self.slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self.slots, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def reorder(self, index: torch.LongTensor) -> None:
        raise ValueError("a static KV cache cannot reorder rows (beam search uses KVCache)")

    def crop(self, length: int) -> None:
        raise ValueError("a static KV cache cannot roll back (speculative decoding uses KVCache)")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 1, T, head_dim] for `positions` [B, T], in Llama's rotate-half layout."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    )
    angles = positions[:, None, :, None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def sinusoidal_embedding(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """The fixed sin/cos table of "Attention is all you need" (interleaved), [B, T, d_model]."""
    inv_freq = 1.0 / 10000.0 ** (
        torch.arange(0, d_model, 2, device=positions.device, dtype=torch.float32) / d_model
    )
    angles = positions[..., None].float() * inv_freq
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Per-head ALiBi slopes (Press et al.), including their rule for non-power-of-2 heads."""

    def power_of_2(n: int) -> list[float]:
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_head))
    slopes = power_of_2(closest)
    if closest < n_head:
        slopes += power_of_2(2 * closest)[0::2][: n_head - closest]
    return torch.tensor(slopes)


def relative_bucket(
    rel: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucket of `rel` = key position - query position: exact for small distances,
    logarithmic up to `max_distance`, and one bucket beyond."""
    buckets = torch.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = (-rel).clamp(min=0)
    max_exact = num_buckets // 2
    # clamp keeps log() finite for the small distances torch.where discards anyway
    large = (
        max_exact
        + (
            torch.log(rel.clamp(min=max_exact).float() / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(rel < max_exact, rel, large)


# SDPA kernels on CUDA, first choice first: cuDNN's fused attention runs Hopper's
# warp-specialized kernels (FlashAttention-3's design), faster than FlashAttention-2 on an
# H100/H200; SDPA skips a backend that cannot take a call (a mask, GQA, a head size) and falls
# to the next. bench/pretrain.py --levers measures the difference.
ATTENTION_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]


class Fused(nn.Module):
    """Several `nn.Linear` projections of the same input (q/k/v, gate/up) as one matmul on
    CUDA: one GEMM of N = sum of the outputs keeps the GPU busier than three small ones
    (nanoGPT's `c_attn` is one Linear for this reason). The parameters stay separate (names,
    LoRA, quantization, checkpoints and transformers' layouts see no change).

    Training concatenates the weights in each forward (a copy of a few MB, cheap beside the
    GEMM; autograd splits the gradient back). Decoding streams every weight once per token,
    so a copy would triple its memory traffic: `pack()` stores the weights in one buffer
    whose rows *are* the parameters (views), and the forward reads the buffer. On CPU the
    projections stay separate, so fp32 results there are bitwise those of separate Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", None, persistent=False)
        self.register_buffer("bias", None, persistent=False)

    def forward(self, x: torch.Tensor, linears: tuple[nn.Module, ...]) -> list[torch.Tensor]:
        if not x.is_cuda or not all(type(m) is nn.Linear for m in linears):
            return [m(x) for m in linears]  # swapped (LoRA, quantized) layers run their own
        sizes = [m.out_features for m in linears]
        if self.weight is not None:
            return list(F.linear(x, self.weight, self.bias).split(sizes, dim=-1))
        return list(fused_linear(x, linears).split(sizes, dim=-1))

    def pack(self, linears: tuple[nn.Module, ...]) -> None:
        """Make the weights (and biases) views into one contiguous buffer each."""
        if not all(type(m) is nn.Linear for m in linears):
            return
        with torch.inference_mode(False), torch.no_grad():
            self.weight = torch.cat([m.weight.data for m in linears])
            self.bias = None
            if linears[0].bias is not None:
                self.bias = torch.cat([m.bias.data for m in linears])
            start = 0
            for m in linears:
                end = start + m.out_features
                m.weight.data = self.weight[start:end]
                if self.bias is not None:
                    m.bias.data = self.bias[start:end]
                start = end

    def unpack(self) -> None:
        """Forget the buffer (the parameters keep their values and may be re-allocated)."""
        self.weight = self.bias = None


def fused_linear(x: torch.Tensor, linears: tuple[nn.Module, ...]) -> torch.Tensor:
    """`torch.cat([m(x) for m in linears], -1)` as one matmul over concatenated weights."""
    weight = torch.cat([m.weight for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return F.linear(x, weight, bias)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.dropout = cfg.dropout
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.fused = Fused()

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.fused(x, (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # unmasked calls only (training, prefill): measured for those; a masked one-query
        # decoding step ran slower under cuDNN than under PyTorch's own choice
        fast = q.is_cuda and mask is None
        with sdpa_kernel(ATTENTION_ORDER, set_priority=True) if fast else nullcontext():
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=self.n_kv_head != self.n_head,
            )
        return self.resid_drop(self.o_proj(y.transpose(1, 2).reshape(B, T, -1)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.fused = Fused()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            gate, up = self.fused(x, (self.gate_proj, self.up_proj))
            h = F.silu(gate) * up
        else:
            # GPT-2's tanh approximation, so GPT-2 weights behave as trained
            h = F.gelu(self.up_proj(x), approximate="tanh")
        return self.drop(self.down_proj(h))


IGNORE = -100  # label value that contributes no loss (PyTorch's cross_entropy default)


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy in fp32, number of labels != IGNORE)."""
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return total, (labels != IGNORE).sum()


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, mask, is_causal, cache, layer)
        return x + self.mlp(self.norm2(x))


def relayout_linears(model: nn.Module, batch_size: int) -> None:
    """Give every plain `nn.Linear` of `model` the weight layout that decoding `batch_size`
    rows reads fastest (see `GPT.use_decode_layout`, which explains why); any model may call it."""
    # made outside inference mode, so the model can still be trained afterwards
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            if type(module) is not nn.Linear or type(module.weight.data) is not torch.Tensor:
                continue  # swapped modules (LoRA, quantized) and sharded (DTensor) weights
            w = module.weight.data
            if w.device.type == "cpu" and w.dtype == torch.float32 and batch_size <= 2:
                if not w.t().is_contiguous():
                    module.weight.data = w.t().contiguous().t()
            elif not w.is_contiguous():
                module.weight.data = w.contiguous()


class GPT(nn.Module):
    """Token embedding → `n_layer` pre-norm blocks → final norm → lm head.

    Parameter names: `tok_emb`, `pos_emb` (learned only), `rel_bias` (relative only, shared
    by all layers), `blocks.{i}.{norm1,attn,norm2,mlp}`, `norm_f`, `lm_head` (or `score` for
    a reward model). All projections are plain `nn.Linear` (`attn.{q,k,v,o}_proj`,
    `mlp.{gate,up,down}_proj`) so LoRA and quantization can swap them. `aux` holds trainable
    extras an objective attaches (a projection, a value head): they train, DDP/FSDP and the
    training state see them, and checkpoints leave them out. Set `gradient_checkpointing =
    True` to recompute each block in the backward pass while training.
    """

    supports_static_cache = True  # make_cache(static=True): CUDA-graph decoding
    # LoRA targets by group (model/contract.py): dotted suffixes of Linear module names
    lora_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "mlp": ("gate_proj", "up_proj", "down_proj"),
    }

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        if config.pos == "learned":
            self.pos_emb = nn.Embedding(config.max_seq_len, config.d_model)
        if config.pos == "relative":
            self.rel_bias = nn.Embedding(config.rel_buckets, config.n_head)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = make_norm(config)
        if config.head == "score":
            self.score = nn.Linear(config.d_model, 1, bias=False)
        else:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.aux = nn.ModuleDict()
        self.tie_weights()
        self._init_weights()

    def tie_weights(self) -> None:
        """Share the token embedding with the lm head when the config ties them (again after
        a load that assigned them as two tensors)."""
        # a quantized tied head (model/quant.py) reads the int8 embedding table itself
        if (
            self.config.tie_embeddings
            and self.config.head == "lm"
            and isinstance(self.lm_head, nn.Linear)
        ):
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self) -> None:
        # GPT-2: N(0, 0.02) everywhere, with the projections that write into the residual
        # stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth.
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if self.config.head == "score":  # a small start, so the initial rewards sit near 0
            nn.init.normal_(
                self.score.weight, mean=0.0, std=1.0 / math.sqrt(self.config.d_model + 1)
            )
        std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=std)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once). `non_embedding` drops the lookup-only tables:
        the position embedding, and the token embedding unless it doubles as the lm head."""
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("aux."))
        if non_embedding:
            if self.config.pos == "learned":
                n -= self.pos_emb.weight.numel()
            if not self.config.tie_embeddings or self.config.head != "lm":
                n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward) at context `seq_len`, for MFU:
        6N for the weights plus 12 * n_layer * d_model * seq_len for attention scores."""
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.d_model * seq_len

    def make_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        static: bool = False,
    ) -> KVCache:
        """An empty KV cache for `batch_size` rows of up to `max_len` tokens (prompt included);
        device and dtype default to the model's. `static` gives a `StaticKVCache` (fixed
        shapes, for CUDA-graph decoding)."""
        if not self.config.causal:
            raise ValueError("a KV cache needs a causal model; this one has causal=False")
        if max_len > self.config.max_seq_len:
            raise ValueError(
                f"cache max_len {max_len} exceeds the model's max_seq_len {self.config.max_seq_len}"
            )
        weight = self.tok_emb.weight
        return (StaticKVCache if static else KVCache)(
            self.config.n_layer,
            batch_size,
            self.config.n_kv_head,
            max_len,
            self.config.head_dim,
            device=weight.device if device is None else device,
            dtype=weight.dtype if dtype is None else dtype,
        )

    def use_decode_layout(self, batch_size: int) -> None:
        """Store each plain `nn.Linear` weight in the memory order that decoding `batch_size`
        rows at a time reads fastest. Shapes, values, dtypes and names stay as they are, so
        state dicts, LoRA and checkpoints see no difference (the savers call `.contiguous()`).
        A no-op when the layout is already right; `sample.Runner` calls it for every run.

        Why: decoding one or two rows is a GEMV per projection, bound by how fast the weights
        stream. On CPU in float32, MKL's GEMV reads a weight laid out [in, out] (`W.t()`
        contiguous, GPT-2's Conv1D layout) at ~25-28 GB/s but the row-major [out, in] of
        `nn.Linear` at ~17 GB/s (2-core AVX-512 EPYC, cold cache, 1 or 2 threads alike), so
        gpt2-124m decoded batch-1 at 0.9x transformers' speed; with this 1.1x, and 1.2-1.3x
        faster than before for 1-2 rows. From 4 rows on MKL runs a GEMM, which is as fast or
        a little faster (3-10% at 8 rows) row-major, as are bfloat16/float16 (oneDNN) and GPU
        kernels: there the weights are made contiguous again (~0.15 s for 124M weights).

        On CUDA the q/k/v (and gate/up) weights are also packed into one buffer per block
        (`Fused.pack`), so each step reads them with one GEMV instead of three.
        """
        relayout_linears(self, batch_size)
        if self.tok_emb.weight.is_cuda:
            for block in self.blocks:
                block.attn.fused.pack((block.attn.q_proj, block.attn.k_proj, block.attn.v_proj))
                if block.mlp.swiglu:
                    block.mlp.fused.pack((block.mlp.gate_proj, block.mlp.up_proj))

    def _apply(self, fn: Any, recurse: bool = True) -> GPT:
        # .to()/.cuda()/.half() re-allocate each parameter and each packed buffer separately,
        # after which they would no longer share memory: forget the packing first.
        for module in self.modules():
            if isinstance(module, Fused):
                module.unpack()
        return super()._apply(fn, recurse)

    def forward(
        self,
        idx: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
        hidden_layers: tuple[int, ...] | list[int] = (),
        logits_to_keep: int = 0,
        labels: torch.Tensor | None = None,
        cache_slots: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """Logits [B, T, V] for tokens `idx` [B, T] (scores [B, T, 1] for a reward model).
        `return_hidden` adds the final-norm hidden states [B, T, d_model]: `(logits, hidden)`.
        `hidden_layers` adds the residual stream at those depths, as transformers counts them
        (0 = the embeddings, i = the output of block i, 1-based): `(logits, [h, ...])`, for
        feature distillation. `logits_to_keep=n > 0` computes the logits of the last n
        positions only, [B, n, V], as transformers' argument of that name: a prefill needs just
        the last, and the lm head is the largest matmul of a small model.

        `labels` [B, T] (IGNORE = -100 where no loss) returns `(summed cross-entropy in fp32,
        number of labels)` instead of logits: the loss is then part of the forward, so
        torch.compile fuses the upcast and log-softmax of the largest tensor of a step (the
        [B, T, V] logits) instead of materializing them in fp32.

        `attention_mask` [B, S] (S = cached length + T) marks real tokens True, for padding.
        `position_ids` [B, T] default to the count of real tokens before each one
        (`cumsum(mask) - 1`, clamped at 0) when a mask is given, else `cache.length + arange(T)`.
        With `cache`, the new keys/values are stored at `cache.length`, which then advances.
        With a `StaticKVCache`, they go to the slots `cache_slots` [T] names instead, and
        `position_ids` [B, T] and `attention_mask` [B, T] (the new tokens' real/padding flags)
        are given by the caller; the cache's length is the caller's to keep.

        `segment_ids` [B, T] (no cache) packs several documents in a row: a token attends
        only to earlier tokens with the same id (a block-diagonal causal mask); give
        `position_ids` restarting at each document with it. Absent, nothing changes.
        """
        cfg = self.config
        B, T = idx.shape
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) cannot be used with a KV cache")
        if isinstance(cache, StaticKVCache):
            return self._forward_static(
                idx, position_ids, attention_mask, cache, cache_slots, logits_to_keep
            )
        past = 0
        if cache is not None:
            if not cfg.causal:
                raise ValueError("a KV cache needs a causal model; this one has causal=False")
            if cache.batch_size != B:
                raise ValueError(f"cache holds {cache.batch_size} rows but idx has {B}")
            if cache.length + T > cache.max_len:
                raise ValueError(
                    f"cache is full: {cache.length} + {T} tokens > max_len {cache.max_len}"
                )
            past = cache.length
        kv_len = past + T
        if kv_len > cfg.max_seq_len:
            raise ValueError(f"sequence length {kv_len} exceeds max_seq_len {cfg.max_seq_len}")
        if attention_mask is not None:
            if attention_mask.shape != (B, kv_len):
                raise ValueError(
                    f"attention_mask must be [B, S] = [{B}, {kv_len}], "
                    f"got {list(attention_mask.shape)}"
                )
            attention_mask = attention_mask.bool()
        if segment_ids is not None and segment_ids.shape != (B, T):
            raise ValueError(
                f"segment_ids must be [B, T] = [{B}, {T}], got {list(segment_ids.shape)}"
            )
        contiguous = position_ids is None and attention_mask is None  # positions past..kv_len
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, kv_len, device=idx.device).expand(B, T)
        elif position_ids.shape != (B, T):
            raise ValueError(
                f"position_ids must be [B, T] = [{B}, {T}], got {list(position_ids.shape)}"
            )

        x = self.tok_emb(idx)
        if cfg.pos == "learned" and contiguous:
            # the same rows for every sequence: a broadcast slice, whose backward is a sum over
            # the batch, instead of a B*T-row gather and scatter-add (as nanoGPT does)
            x = x + self.pos_emb.weight[past:kv_len]
        elif cfg.pos == "learned":
            x = x + self.pos_emb(position_ids)
        elif cfg.pos == "sinusoidal":
            x = x + sinusoidal_embedding(position_ids, cfg.d_model).to(x.dtype)
        x = self.drop(x)
        rope = None
        if cfg.pos == "rope":
            rope = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)

        key_positions = position_ids
        if cache is not None:
            cache.positions[:, past:kv_len] = position_ids
            key_positions = cache.positions[:, :kv_len]
        mask, is_causal = self._attention_mask(
            position_ids, key_positions, attention_mask, past, x.dtype, segment_ids
        )

        if return_hidden and hidden_layers:
            raise ValueError("ask for return_hidden or hidden_layers, not both")
        for i in hidden_layers:
            if not 0 <= i <= cfg.n_layer:
                raise ValueError(f"hidden_layers: {i} is not in 0..{cfg.n_layer}")
        states = {0: x} if 0 in hidden_layers else {}
        checkpointing = self.gradient_checkpointing and self.training and cache is None
        for layer, block in enumerate(self.blocks):
            if checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, mask, is_causal, None, layer, use_reentrant=False)
            else:
                x = block(x, rope, mask, is_causal, cache, layer)
            if layer + 1 in hidden_layers:
                states[layer + 1] = x
        if cache is not None:
            cache.length = kv_len
        hidden = self.norm_f(x)
        head = self.score if cfg.head == "score" else self.lm_head
        logits = head(hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden)
        if labels is not None:
            return token_loss(logits, labels)
        if hidden_layers:
            return logits, [states[i] for i in hidden_layers]
        return (logits, hidden) if return_hidden else logits

    def _forward_static(
        self,
        idx: torch.Tensor,
        position_ids: torch.Tensor | None,
        new_mask: torch.Tensor | None,
        cache: StaticKVCache,
        slots: torch.Tensor | None,
        logits_to_keep: int,
    ) -> torch.Tensor:
        """`forward` over a StaticKVCache: every shape fixed, no host-side lengths, so the
        one-token decoding step can run as a CUDA graph. Same arithmetic as the plain path."""
        cfg = self.config
        if position_ids is None or slots is None:
            raise ValueError("a static KV cache needs position_ids and cache_slots")
        new_mask = torch.ones_like(idx, dtype=torch.bool) if new_mask is None else new_mask.bool()
        cache.key_mask.index_copy_(1, slots, new_mask)
        cache.positions.index_copy_(1, slots, position_ids)
        x = self.tok_emb(idx)
        if cfg.pos == "learned":
            x = x + self.pos_emb(position_ids)
        elif cfg.pos == "sinusoidal":
            x = x + sinusoidal_embedding(position_ids, cfg.d_model).to(x.dtype)
        rope = None
        if cfg.pos == "rope":
            rope = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, x.dtype)
        mask, is_causal = self._attention_mask(
            position_ids, cache.positions, cache.key_mask, slots, x.dtype
        )
        cache.slots = slots
        try:
            for layer, block in enumerate(self.blocks):
                x = block(x, rope, mask, is_causal, cache, layer)
        finally:
            cache.slots = None
        hidden = self.norm_f(x)
        return self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden)

    def _attention_mask(
        self,
        query_positions: torch.Tensor,
        key_positions: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past: int | torch.Tensor,
        dtype: torch.dtype,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, bool]:
        """SDPA's (attn_mask, is_causal). Without padding or a position bias this stays
        (None, causal) so the flash kernels run; otherwise a bool mask or an additive float
        bias [B, H, T, S] with -inf where attention is not allowed. `past` is the number of
        cached slots before the queries, or (static cache) the queries' slots as a tensor [T]."""
        cfg = self.config
        T, S = query_positions.shape[1], key_positions.shape[1]
        device = query_positions.device
        bias = None
        if cfg.pos in ("alibi", "relative"):
            rel = key_positions[:, None, :] - query_positions[:, :, None]  # [B, T, S]
            if cfg.pos == "alibi":
                slopes = alibi_slopes(cfg.n_head).to(device)
                bias = -slopes[None, :, None, None] * rel.abs()[:, None].float()
            else:
                buckets = relative_bucket(
                    rel,
                    bidirectional=not cfg.causal,
                    num_buckets=cfg.rel_buckets,
                    max_distance=cfg.rel_max_distance,
                )
                bias = self.rel_bias(buckets).permute(0, 3, 1, 2)
            bias = bias.to(dtype)

        static = isinstance(past, torch.Tensor)
        plain = bias is None and attention_mask is None and segment_ids is None
        if not static and plain and not (past and T > 1):
            # plain training/prefill (causal via is_causal) or one-token decoding (sees all)
            return None, cfg.causal and past == 0
        first = past if static else torch.arange(past, S, device=device)
        query_slots = first[:, None]
        key_slots = torch.arange(S, device=device)[None, :]
        allowed = (key_slots <= query_slots) if cfg.causal else None  # [T, S]
        if attention_mask is not None:
            keys = attention_mask[:, None, None, :]  # [B, 1, 1, S]
            allowed = keys if allowed is None else allowed & keys
            # a padding query would see no key at all (softmax of all -inf = NaN): let every
            # query see itself; real queries already do, and nobody attends to a padding key
            allowed = allowed | (key_slots == query_slots)
        if segment_ids is not None:
            same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, S]
            allowed = same if allowed is None else allowed & same
        if bias is None:
            return allowed, False
        if allowed is not None:
            bias = bias.masked_fill(~allowed, float("-inf"))
        return bias, False
