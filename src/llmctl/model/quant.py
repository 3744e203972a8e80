"""Quantized modules, the quantization math, and the on-disk layout of quantized checkpoints.

Schemes (`QuantSpec.method`):
- `int8`: weight-only; each output channel (row) of a Linear is int8 with one scale,
  symmetric: w ≈ q * s, q in [-127, 127], s = max|row| / 127.
- `int4`: weight-only, group-wise: every `group_size` consecutive inputs of a row share a
  scale; symmetric (q in [-8, 7], s = max|group| / 7.5, stored as the nibble q + 8) or, with
  `zero_point`, asymmetric (nibble in [0, 15], w ≈ (nibble - z) * s, one uint8 zero point z per
  group). Two nibbles per byte: column 2j in the low nibble, 2j+1 in the high one. A width K
  the group does not divide uses the largest even group g ≤ group_size that divides K if
  g ≥ group_size / 2, else one group per row ("per-channel"); `layer_groups` says which.
- `dynamic`: int8 weights as `int8`; at run time each token's activation row is quantized to
  int8 with its own scale (max|row| / 127).
- `static`: int8 weights as `int8`; each Linear's input is quantized to int8 with one scale
  fixed ahead by calibration (`observe`: min/max or a percentile of |x|) and clamped.
- `qat`: `FakeQuantLinear` trains with the int4/int8 weight grid in the forward pass and a
  straight-through gradient; `convert_qat` then writes the exact int4/int8 weight-only form.
The token embedding is int8 per row (`quantize_embeddings`), and the lm head with it: a tied
head reads the embedding's int8 table (stored once), an untied one is int8 per channel.

On disk (`model.safetensors`, plain integer and float tensors, never tensor subclasses), for a
quantized Linear or embedding `P`:
    P.qweight      int8 [N, K] (int8/dynamic/static, embedding) or uint8 [N, ceil(K/2)] (int4)
    P.scale        [N] (int8) or [N, K/g] (int4), in the checkpoint's float dtype
    P.zero         uint8 [N, K/g] (int4 with zero points only)
    P.input_scale  [1] (static only), in the checkpoint's float dtype
    P.bias         the checkpoint's dtype (when the layer has one)
and config.json holds `"quantization": {"format": 1, "method", "group_size", "zero_point",
"quantize_embeddings", "modules": [...]}`: `io.register_swap("quantization", ...)` at the end
of this module makes `save_checkpoint` write it and `load_model` swap the modules on the meta
model (`apply_quantization`) before it loads and checks every tensor.

Kernels (why not torchao): torchao 0.18 imports on torch 2.13 CPU and its int8 weight-only,
int8 dynamic and QAT fake-quant paths run, but its int4 weight-only does not run on CPU (it
needs the mslk package or CUDA), its int8 weight-only CPU linear converts the whole int8
weight back to float on every call (slower than fp32), it prints library-load failures on
import, and its tensor subclasses are not our storage format. So the kernels are torch's own:
`torch._weight_int8pack_mm` (int8 weights; in bf16 ~2.7x fewer ms than an fp32 GEMV for
GPT-2-124M weights on this CPU) and `aten._weight_int4pack_mm_for_cpu` (groups 32/64/128/256;
others dequantize). `dynamic`/`static` quantize activations to int8 for real but multiply the
integer-valued activations with `_weight_int8pack_mm` too: on this CPU `torch._int_mm` and
oneDNN's `qlinear_pointwise` took 10-30x longer at batch 1. The fake-quant and observers are
a few lines each, hand-written; torchao serves the tests as an oracle.

Example:
    >>> report = quantize(model, QuantSpec("int4", group_size=64))
    >>> save_checkpoint(out, model)          # config.json gets the quantization block
    >>> model = load_model(out)              # the same modules, the same integers
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmctl.model.io import register_swap

METHODS = ("int8", "int4", "dynamic", "static", "qat")
OBSERVERS = ("minmax", "percentile")
FORMAT = 1
KERNEL_GROUPS = (32, 64, 128, 256)  # what aten._weight_int4pack_mm_for_cpu accepts
_TINY = 1e-12  # a row or group of zeros still gets a positive scale


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how. `bits` is for `qat` (4 or 8). Example: QuantSpec("int8")."""

    method: str
    group_size: int = 64
    zero_point: bool = False
    quantize_embeddings: bool = True
    bits: int = 4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; one of {', '.join(METHODS)}")
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or g < 2 or g % 2:
            raise ValueError(f"group size must be a positive even number, got {g!r}")
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits!r}")

    def block(self, modules: list[str]) -> dict[str, Any]:
        """The config.json `quantization` block (after QAT the method is the weight-only one)."""
        method = self.method if self.method != "qat" else f"int{self.bits}"
        d = asdict(self)
        d.pop("bits")
        return {"format": FORMAT, **d, "method": method, "modules": modules}

    @classmethod
    def from_block(cls, block: dict[str, Any]) -> QuantSpec:
        keys = ("method", "group_size", "zero_point", "quantize_embeddings")
        if not isinstance(block, dict) or block.get("format") != FORMAT:
            raise ValueError(f"quantization block: format must be {FORMAT}")
        missing = [k for k in keys if k not in block]
        if missing:
            raise ValueError(f"quantization block: missing key(s) {', '.join(missing)}")
        if block["method"] == "qat":
            raise ValueError("quantization block: method 'qat' is never stored")
        return cls(**{k: block[k] for k in keys})


# ---------------------------------------------------------------------------- the math


def int8_per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale float32 [N]): symmetric per row, w ≈ q * scale[:, None]."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=_TINY)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int4_group(width: int, group_size: int) -> int:
    """The group an int4 row of `width` inputs uses: `group_size` if it divides the width,
    else the largest even divisor g ≤ group_size when g ≥ group_size / 2, else the width."""
    if width % group_size == 0:
        return group_size
    g = max((d for d in range(2, group_size + 1, 2) if width % d == 0), default=0)
    return g if g * 2 >= group_size else width


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` (float32) in `dtype`, rounded up: the grid then still spans the group's range, so
    every weight is within half a step of its code (bf16 scales would otherwise clip)."""
    h = x.to(dtype)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def int4_qparams(
    w: torch.Tensor, group: int, zero_point: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale [N, K/group] in w's dtype, zero uint8 [N, K/group] or None) for `w` [N, K]."""
    dtype = w.dtype
    tiny = max(torch.finfo(dtype).tiny, _TINY)
    g = w.detach().float().reshape(w.shape[0], -1, group)
    if zero_point:
        lo = g.amin(-1).clamp(max=0)
        hi = g.amax(-1).clamp(min=0)
        scale = _round_up(((hi - lo) / 15.0).clamp(min=tiny), dtype)
        zero = torch.round(-lo / scale.float()).clamp(0, 15).to(torch.uint8)
        return scale, zero
    return _round_up((g.abs().amax(-1) / 7.5).clamp(min=tiny), dtype), None


def int4_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int
) -> torch.Tensor:
    """The nibbles (int32 [N, K], 0..15) of `w` on the grid of (scale, zero)."""
    n, k = w.shape
    g = w.detach().float().reshape(n, -1, group)
    s = scale.float()[..., None]
    if zero is None:
        q = torch.round(g / s).clamp(-8, 7) + 8
    else:
        q = (torch.round(g / s) + zero.float()[..., None]).clamp(0, 15)
    return q.reshape(n, k).to(torch.int32)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, ceil(K/2)] from nibbles [N, K]: column 2j low, 2j+1 high (odd K: padded 0)."""
    c = codes.to(torch.uint8)
    if c.shape[1] % 2:
        c = F.pad(c, (0, 1))
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of `pack_int4`: int32 [N, width] nibbles."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :width].to(torch.int32)


def int4_dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int
) -> torch.Tensor:
    """float32 [N, K] weights of nibbles `codes` [N, K]."""
    n, k = codes.shape
    z = 8.0 if zero is None else zero.float()[..., None]
    return ((codes.float().reshape(n, -1, group) - z) * scale.float()[..., None]).reshape(n, k)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, zero_point: bool) -> torch.Tensor:
    """`w` rounded onto the grid its weight-only quantization stores (same arithmetic as the
    conversion, so `convert_qat` reproduces it exactly), with a straight-through gradient."""
    with torch.no_grad():
        if bits == 8:
            q, scale = int8_per_row(w)
            wq = q.float() * scale[:, None]
        else:
            group = int4_group(w.shape[1], group_size)
            scale, zero = int4_qparams(w, group, zero_point)
            wq = int4_dequantize(int4_codes(w, scale, zero, group), scale, zero, group)
    # forward: the quantized weights; backward: the identity (straight-through estimator)
    return w + (wq.to(w.dtype) - w).detach()


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8: (integer-valued x / s, s [..., 1]) with s = max|row| / 127."""
    s = (x.abs().amax(dim=-1, keepdim=True).float() / 127.0).clamp(min=_TINY)
    return torch.round(x.float() / s).clamp(-127, 127), s


def _kernel_ok(x: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> bool:
    """Whether a CPU integer kernel may run, and pays. They have no backward, so not when a
    gradient must flow to x (a LoRA on a quantized base trains through F.linear instead). And
    they are matrix-vector kernels whose time grows with the rows: at one row (decoding at
    batch 1) they match or beat dequantizing and a float GEMM (int4: up to 2.5x faster), from
    two rows on they lose, and at 2,048 rows (eval, prefill) int8 is ~50x and int4 ~125x
    slower (measured with torch 2.13 on this project's CPU, 1 thread, d 384-768)."""
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    one_row = x.numel() == x.shape[-1]
    return x.device.type == "cpu" and x.dtype in dtypes and not needs_grad and one_row


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (q [N, K] int8 * scale [N]).T in x's dtype."""
    if _kernel_ok(x, (torch.float32, torch.bfloat16, torch.float16)):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = torch._weight_int8pack_mm(x2, q, scale.to(x.dtype))
        return y.reshape(*x.shape[:-1], q.shape[0])
    return F.linear(x, q.to(x.dtype) * scale.to(x.dtype)[:, None])


# ---------------------------------------------------------------------------- modules


class Int8Linear(nn.Module):
    """A Linear with int8 weights per output channel. `act`: None (weight-only), "dynamic"
    (per-token int8 activations) or "static" (one calibrated activation scale)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, act: str | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.act = in_features, out_features, act
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        if act == "static":
            self.register_buffer("input_scale", torch.ones(1))

    @classmethod
    def from_linear(cls, lin: nn.Linear, act: str | None = None) -> Int8Linear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, act)
        m.qweight, scale = int8_per_row(lin.weight)
        m.scale = scale.to(lin.weight.dtype)
        if lin.bias is not None:
            m.bias = lin.bias.detach().clone()
        return m

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is None:
            y = int8_matmul(x, self.qweight, self.scale)
        else:
            if self.act == "dynamic":
                xq, s = quantize_rows(x)
            else:
                s = self.input_scale.float()
                xq = torch.round(x.float() / s).clamp(-127, 127)
            # integer-valued activations (exact in bf16 and fp32) times int8 weights
            y = int8_matmul(xq.to(x.dtype), self.qweight, self.scale) * s.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, act={self.act}"


class Int4Linear(nn.Module):
    """A Linear with group-wise int4 weights, two per byte (see the module docstring)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, group: int, zero_point: bool
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        groups = in_features // group
        packed = torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8)
        self.register_buffer("qweight", packed)
        self.register_buffer("scale", torch.ones(out_features, groups))
        zero = torch.zeros(out_features, groups, dtype=torch.uint8) if zero_point else None
        self.register_buffer("zero", zero)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernel: dict[Any, Any] = {}  # CPU kernel's packed weights, made on first use

    @classmethod
    def from_weight(
        cls, w: torch.Tensor, bias: torch.Tensor | None, group_size: int, zero_point: bool
    ) -> Int4Linear:
        n, k = w.shape
        group = int4_group(k, group_size)
        m = cls(k, n, bias is not None, group, zero_point)
        scale, zero = int4_qparams(w, group, zero_point)
        m.qweight = pack_int4(int4_codes(w, scale, zero, group))
        m.scale, m.zero = scale, zero
        if bias is not None:
            m.bias = bias.detach().clone()
        return m

    def dequantize(self) -> torch.Tensor:
        codes = unpack_int4(self.qweight, self.in_features)
        return int4_dequantize(codes, self.scale, self.zero, self.group)

    def _kernel_args(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        # the kernel's limits: groups 32/64/128/256, outputs a multiple of 16
        if self.group not in KERNEL_GROUPS or self.in_features % self.group:
            return None
        if self.out_features % 16:
            return None
        key = (self.qweight.data_ptr(), dtype)
        if key not in self._kernel:
            with torch.inference_mode(False), torch.no_grad():
                codes = unpack_int4(self.qweight, self.in_features)
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
                # the kernel computes (nibble - 8) * scale + zero; ours is (nibble - z) * scale
                s = self.scale.float()
                z = 8.0 if self.zero is None else self.zero.float()
                zf = (8.0 - z) * s if self.zero is not None else torch.zeros_like(s)
                sz = torch.stack([s.t(), zf.t()], dim=-1).contiguous().to(dtype)
            self._kernel = {key: (packed, sz)}
        return self._kernel[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = None
        if _kernel_ok(x, (torch.float32, torch.bfloat16)):
            args = self._kernel_args(x.dtype)
        if args is not None:
            x2 = x.reshape(-1, self.in_features).contiguous()
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, args[0], self.group, args[1])
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantize().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        zp = self.zero is not None
        return f"{self.in_features}, {self.out_features}, group={self.group}, zero_point={zp}"


class Int8Embedding(nn.Module):
    """A token embedding stored int8 per row (one scale per token)."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        q = torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", torch.ones(num_embeddings))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> Int8Embedding:
        m = cls(emb.num_embeddings, emb.embedding_dim)
        m.qweight, scale = int8_per_row(emb.weight)
        m.scale = scale.to(emb.weight.dtype)
        return m

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    @property
    def weight(self) -> torch.Tensor:
        """The table dequantized, in the model's float dtype and on its device, which is what
        the model contract reads `tok_emb.weight` for (a copy, made on each access)."""
        return self.dequantize().to(self.scale.dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.qweight).to(self.scale.dtype) * self.scale[idx][..., None]


class TiedInt8Head(nn.Module):
    """The lm head tied to an `Int8Embedding`: reads its int8 table, owns no tensors (so the
    table is stored once, as the tied float weight is)."""

    def __init__(self, embedding: Int8Embedding) -> None:
        super().__init__()
        self._emb = (embedding,)  # a tuple: not a submodule, so no second copy in state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self._emb[0]
        return int8_matmul(x, emb.qweight, emb.scale)


class FakeQuantLinear(nn.Linear):
    """A Linear that trains on the int4/int8 grid (QAT): forward with `fake_quantize`d weights,
    gradients straight through to the float weights."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int,
        zero_point: bool,
    ) -> None:  # fmt: skip
        super().__init__(in_features, out_features, bias=bias)
        self.bits, self.group_size, self.zero_point = bits, group_size, zero_point

    @classmethod
    def from_linear(cls, lin: nn.Linear, spec: QuantSpec) -> FakeQuantLinear:
        with torch.device("meta"):
            m = cls(lin.in_features, lin.out_features, lin.bias is not None, spec.bits,
                    spec.group_size, spec.zero_point)  # fmt: skip
        m.weight = lin.weight
        m.bias = lin.bias
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fake_quantize(self.weight, self.bits, self.group_size, self.zero_point)
        return F.linear(x, w.to(x.dtype) if x.dtype != w.dtype else w, self.bias)


QUANT_MODULES = (Int8Linear, Int4Linear, Int8Embedding, TiedInt8Head)


# ---------------------------------------------------------------------------- whole models


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
    """(name, parent, attribute, Linear) for every Linear inside `model.blocks`."""
    found = []
    for name, mod in model.named_modules():
        if not name.startswith("blocks."):
            continue
        for attr, child in mod.named_children():
            if type(child) is nn.Linear:
                found.append((f"{name}.{attr}", mod, attr, child))
    return found


def _swap_linear(lin: nn.Linear, spec: QuantSpec) -> nn.Module:
    if spec.method == "int4" or (spec.method == "qat" and spec.bits == 4):
        return Int4Linear.from_weight(lin.weight, lin.bias, spec.group_size, spec.zero_point)
    act = spec.method if spec.method in ("dynamic", "static") else None
    return Int8Linear.from_linear(lin, act)


def quantized_modules(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantized module: name, kind, shape, and the group (int4) used."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):
            how = f"group {m.group}"
            rows.append({"module": name, "kind": "int4", "shape": [m.out_features,
                         m.in_features], "group": m.group, "how": how})  # fmt: skip
        elif isinstance(m, Int8Linear):
            kind = "int8" if m.act is None else f"int8 ({m.act} int8 activations)"
            rows.append({"module": name, "kind": kind, "shape": [m.out_features, m.in_features],
                         "how": "per channel"})  # fmt: skip
        elif isinstance(m, Int8Embedding):
            rows.append({"module": name, "kind": "int8", "shape": [m.num_embeddings,
                         m.embedding_dim], "how": "per row"})  # fmt: skip
        elif isinstance(m, TiedInt8Head):
            rows.append({"module": name, "kind": "int8", "how": "tied to tok_emb"})
    return rows


def layer_groups(model: nn.Module, group_size: int) -> dict[str, str]:
    """int4 layers whose width the group size does not divide: name -> what they use."""
    return {
        name: ("per-channel" if m.group == m.in_features else f"group {m.group}")
        for name, m in model.named_modules()
        if isinstance(m, Int4Linear) and m.group != group_size
    }


@torch.no_grad()
def quantize(
    model: nn.Module, spec: QuantSpec, input_scales: dict[str, float] | None = None
) -> dict[str, Any]:
    """Swap `model`'s Linear layers (and embedding, lm head) for quantized ones, in place.
    `static` needs `input_scales` (from `calibrate`) for every block Linear. FakeQuantLinear
    layers (after QAT) become their exact weight-only form. Returns the config block."""
    if spec.method == "static" and input_scales is None:
        raise ValueError("static quantization needs calibrated input scales")
    for name, parent, attr, lin in block_linears(model):
        new = _swap_linear(lin, spec)
        if spec.method == "static":
            new.input_scale.fill_(input_scales[name])  # type: ignore[index]
        setattr(parent, attr, new)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, FakeQuantLinear):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            new = _swap_linear(mod, spec)
            setattr(parent, name.rsplit(".", 1)[-1], new)
    if spec.quantize_embeddings:
        _quantize_embeddings(model)
    modules = [r["module"] for r in quantized_modules(model)]
    block = spec.block(modules)
    model.quantization = block  # save_checkpoint writes it into config.json
    return block


def _quantize_embeddings(model: nn.Module) -> None:
    tied = model.config.tie_embeddings
    if isinstance(model.tok_emb, nn.Embedding):
        model.tok_emb = Int8Embedding.from_embedding(model.tok_emb)
    if tied:
        model.lm_head = TiedInt8Head(model.tok_emb)
    elif type(model.lm_head) is nn.Linear:
        model.lm_head = Int8Linear.from_linear(model.lm_head)


@torch.no_grad()
def dequantize_model(model: nn.Module) -> int:
    """Turn every quantized module back into nn.Linear / nn.Embedding holding its dequantized
    weights (in the scales' float dtype), in place, and drop the `quantization` block: a
    full-precision model with the quantized model's values, e.g. to merge a LoRA adapter
    into (there is no exact merge into integers). Returns how many modules were replaced."""
    n = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Int8Linear | Int4Linear):
            dtype = mod.scale.dtype
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None,
                            device=mod.scale.device, dtype=dtype)  # fmt: skip
            lin.weight.copy_(mod.dequantize())
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
            new: nn.Module = lin
        elif isinstance(mod, Int8Embedding):
            new = nn.Embedding(mod.num_embeddings, mod.embedding_dim, device=mod.scale.device,
                               dtype=mod.scale.dtype)  # fmt: skip
            new.weight.copy_(mod.dequantize())
        else:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], new)
        n += 1
    if isinstance(getattr(model, "lm_head", None), TiedInt8Head):
        cfg = model.config
        model.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        model.tie_weights()
    if getattr(model, "quantization", None) is not None:
        del model.quantization
    return n


def apply_qat(model: nn.Module, spec: QuantSpec) -> int:
    """Make every block Linear a FakeQuantLinear (weights shared); returns how many."""
    linears = block_linears(model)
    for _, parent, attr, lin in linears:
        setattr(parent, attr, FakeQuantLinear.from_linear(lin, spec))
    return len(linears)


def apply_quantization(model: nn.Module, block: dict[str, Any]) -> None:
    """The load-time swap: turn a freshly built (meta) model into the layout `block` describes,
    so its state dict names, shapes and dtypes are those of the saved tensors."""
    spec = QuantSpec.from_block(block)
    cfg = model.config
    for _, parent, attr, lin in block_linears(model):
        k, n = lin.in_features, lin.out_features
        if spec.method == "int4":
            group = int4_group(k, spec.group_size)
            new: nn.Module = Int4Linear(k, n, lin.bias is not None, group, spec.zero_point)
        else:
            act = spec.method if spec.method in ("dynamic", "static") else None
            new = Int8Linear(k, n, lin.bias is not None, act)
        setattr(parent, attr, new)
    if spec.quantize_embeddings:
        model.tok_emb = Int8Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.tie_embeddings:
            model.lm_head = TiedInt8Head(model.tok_emb)
        else:
            model.lm_head = Int8Linear(cfg.d_model, cfg.vocab_size, False)
    model.quantization = block


# ---------------------------------------------------------------------------- calibration


@dataclass
class Observer:
    """Running statistic of a Linear's input |x| over calibration batches: `minmax` keeps the
    largest |x| seen; `percentile` averages each batch's `percentile`-th percentile of |x|
    (a few outliers then do not stretch the int8 grid over values that never occur)."""

    kind: str = "minmax"
    percentile: float = 99.99
    value: float = 0.0
    batches: int = 0

    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float().flatten()
        if self.kind == "minmax":
            v = float(a.max())
            self.value = max(self.value, v)
        else:
            k = max(1, min(a.numel(), math.ceil(a.numel() * self.percentile / 100.0)))
            v = float(a.kthvalue(k).values)
            self.value += (v - self.value) / (self.batches + 1)
        self.batches += 1

    def scale(self) -> float:
        return max(self.value / 127.0, _TINY)


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    kind: str = "minmax",
    percentile: float = 99.99,
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
) -> dict[str, float]:
    """Run `model` (float) over `batches` of token ids and return each block Linear's input
    scale (name -> float) from an `Observer` of `kind`."""
    if kind not in OBSERVERS:
        raise ValueError(f"unknown observer {kind!r}; one of {', '.join(OBSERVERS)}")
    observers: dict[str, Observer] = {}
    hooks = []
    for name, _, _, lin in block_linears(model):
        obs = observers[name] = Observer(kind, percentile)
        hooks.append(lin.register_forward_pre_hook(lambda m, args, o=obs: o.update(args[0])))
    try:
        n = 0
        for x in batches:
            (forward or (lambda m, t: m(t)))(model, x)
            n += 1
        if n == 0:
            raise ValueError("calibration got no batches")
    finally:
        for h in hooks:
            h.remove()
    return {name: obs.scale() for name, obs in observers.items()}


def _block(model: nn.Module) -> dict[str, Any] | None:
    return getattr(model, "quantization", None)


register_swap("quantization", apply_quantization, _block)
