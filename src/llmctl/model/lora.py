"""LoRA: a low-rank trainable branch beside frozen Linear layers, `y = base(x) + B(A(drop(x))) * s`.

`apply_lora(model, targets, r, alpha, dropout, rslora)` turns each targeted Linear layer of a
`GPT` into a LoRA layer in place and freezes everything else: only `lora_A` and `lora_B` require
grad afterwards. As in PEFT, `lora_A` [r, in] starts Kaiming-uniform random and `lora_B`
[out, r] zero, so an untrained adapter changes nothing; the scale `s` is `alpha / r`, or
`alpha / sqrt(r)` with `rslora` (rank-stabilized LoRA, Kalajdzievski 2023).

The layer keeps its base module's names: the layer's class is swapped for a subclass of its own
class (`LoRALayer`) that adds `lora_A`, `lora_B` and `lora_dropout` and calls the base class's
`forward` first. So `blocks.0.attn.q_proj.weight` stays where a checkpoint has it (plain or
quantized, whatever tensors the base layer keeps), and the base's own forward runs: a frozen
quantized Linear (QLoRA) is never dequantized here. Only `merge` reads `.weight`.

`layer.disabled = True` (or `with adapters_disabled(model):`) runs the base alone, e.g. the
reference model of DPO is the same model with its adapters off.

Example:
    >>> names = apply_lora(model, targets=("q_proj", "v_proj"), r=8, alpha=16)
    >>> names[:2]
    ['blocks.0.attn.q_proj', 'blocks.0.attn.v_proj']
    >>> sum(p.numel() for p in model.parameters() if p.requires_grad)  # adapters only
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch import nn

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
HEAD = "lm_head"
# what `--targets` accepts besides single names
GROUPS = {"attn": ATTENTION, "mlp": MLP, "all": (*ATTENTION, *MLP)}
TARGETS = (*ATTENTION, *MLP, HEAD)


class LoRALayer(nn.Module):
    """Mixin of every LoRA layer; the concrete class is `LoRA<BaseClass>` (see `lora_class`).

    Attributes besides the base's: `lora_A` (Linear in → r, no bias), `lora_B` (Linear r → out,
    no bias), `lora_dropout` (Dropout, or Identity at p = 0), `r`, `lora_alpha`, `rslora`,
    `scaling`, `disabled`.
    """

    base_class: type[nn.Module]
    lora_A: nn.Linear
    lora_B: nn.Linear
    lora_dropout: nn.Module
    r: int
    lora_alpha: float
    rslora: bool
    scaling: float
    disabled: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # the base layer's own forward (plain, quantized, ...)
        if self.disabled:
            return y
        # The adapter keeps its own dtype (fp32 beside a bf16/int8 base); autocast, when on,
        # decides the matmul precision as for any other layer.
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        return y + (self.lora_B(h) * self.scaling).to(y.dtype)

    def extra_repr(self) -> str:
        base = super().extra_repr()
        rs = ", rslora" if self.rslora else ""
        return f"{base}, lora r={self.r}, alpha={self.lora_alpha:g}{rs}"

    def delta(self) -> torch.Tensor:
        """The weight update B @ A * scaling [out, in] in float64 (exact enough to merge)."""
        return self.lora_B.weight.double() @ self.lora_A.weight.double() * self.scaling

    def merge(self) -> nn.Module:
        """Fold the adapter into the base weight and turn back into the base class (in place;
        returns the layer). Needs a floating-point `.weight` [out, in]: a quantized base has
        no exact merge and is refused (merge into the unquantized checkpoint instead)."""
        w = getattr(self, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise ValueError(
                f"cannot merge LoRA into {self.base_class.__name__}: it has no "
                "floating-point weight (merge the adapter into the unquantized base instead)"
            )
        with torch.no_grad():
            w.add_(self.delta().to(device=w.device, dtype=w.dtype))
        strip_lora(self)
        return self


@cache
def lora_class(base: type[nn.Module]) -> type[LoRALayer]:
    """`LoRA<base>`: LoRALayer's forward around `base`'s. One class per base class."""
    return type(
        f"LoRA{base.__name__}", (LoRALayer, base), {"__module__": __name__, "base_class": base}
    )


def _features(module: nn.Module, name: str) -> tuple[int, int]:
    """(in, out) of a Linear-like layer: nn.Linear or anything with integer `in_features` and
    `out_features` (a quantized Linear) and a `forward(x)`."""
    i, o = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if not isinstance(i, int) or not isinstance(o, int) or isinstance(module, nn.Embedding):
        raise ValueError(f"{name}: {type(module).__name__} is not a Linear layer; LoRA needs one")
    return i, o


def _device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        return t.device
    return torch.device("cpu")


def add_lora(
    module: nn.Module,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    rslora: bool = False,
    *,
    name: str = "layer",
) -> LoRALayer:
    """Turn one Linear-like `module` into a LoRA layer in place (A Kaiming-uniform from torch's
    global generator, B zero, fp32, on the module's device); returns it."""
    if isinstance(module, LoRALayer):
        raise ValueError(f"{name}: already has a LoRA adapter")
    if not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    in_f, out_f = _features(module, name)
    device = _device(module)
    module.__class__ = lora_class(type(module))
    assert isinstance(module, LoRALayer)
    module.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=torch.float32)
    module.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=torch.float32)
    module.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    module.train(module.training)  # new submodules start in train mode: follow the layer's
    module.r, module.lora_alpha, module.rslora = r, float(alpha), rslora
    module.scaling = alpha / (math.sqrt(r) if rslora else r)
    module.disabled = False
    if device.type != "meta":  # a meta model gets its values from a file
        # PEFT's (and microsoft/LoRA's) init: A as nn.Linear's default, B zero
        nn.init.kaiming_uniform_(module.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(module.lora_B.weight)
    return module


def strip_lora(module: LoRALayer) -> nn.Module:
    """Remove the adapter (without merging) and give the layer back its base class."""
    for attr in ("lora_A", "lora_B", "lora_dropout"):
        delattr(module, attr)
    for attr in ("r", "lora_alpha", "rslora", "scaling", "disabled"):
        module.__dict__.pop(attr, None)
    module.__class__ = module.base_class
    return module


def vocabulary(
    model: nn.Module | None = None,
) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """(groups, target names) of `model`'s type: its `lora_groups` (model/contract.py) plus
    "all" and the head; GPT's when `model` is None or names none."""
    own = getattr(model, "lora_groups", None)
    groups = dict(own) if own else {"attn": ATTENTION, "mlp": MLP}
    names = tuple(dict.fromkeys(n for g in groups.values() for n in g))
    groups["all"] = names
    return groups, (*names, HEAD)


def resolve_targets(
    targets: Sequence[str] | str, model: nn.Module | None = None
) -> tuple[tuple[str, ...], frozenset[str]]:
    """(target names, the ones named one by one) from `--targets`: `model`'s target names and
    groups (`vocabulary`: attn, mlp, all), as a list or a comma-separated string; sorted in
    the vocabulary's order. A group adapts the layers of it a model has (a GELU MLP has no
    gate_proj); a name given alone must exist."""
    groups, names = vocabulary(model)
    if isinstance(targets, str):
        targets = targets.split(",")
    wanted: set[str] = set()
    explicit: set[str] = set()
    for t in (t.strip() for t in targets):
        if t in groups:
            wanted.update(groups[t])
        elif t in names:
            wanted.add(t)
            explicit.add(t)
        else:
            known = ", ".join((*groups, *names))
            raise ValueError(f"LoRA target {t!r} is not one of {known}")
    if not wanted:
        raise ValueError("LoRA needs at least one target")
    return tuple(t for t in names if t in wanted), frozenset(explicit)


def _matches(name: str, target: str) -> bool:
    # a target is a dotted suffix of the module name ("q_proj", "att.key"), as in PEFT
    return name == target or name.endswith("." + target)


def apply_lora(
    model: nn.Module,
    targets: Sequence[str] | str = ATTENTION,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    rslora: bool = False,
) -> list[str]:
    """Give every layer of `model` named by `targets` (a dotted suffix of its module name:
    q_proj, ..., lm_head, RWKV's att.key ...; or a group: attn, mlp, all) a LoRA branch, and
    freeze every other parameter.
    Returns the module names adapted, in model order. ValueError for an unknown target, a
    target named alone that the model does not have (gate_proj on a GELU MLP), or `lm_head`
    when the head is tied to the token embedding (LoRA there would adapt the embedding too)."""
    wanted, explicit = resolve_targets(targets, model)
    config = getattr(model, "config", None)
    if HEAD in wanted and getattr(config, "tie_embeddings", False):
        raise ValueError(
            "LoRA target lm_head: this model's head is tied to the token embedding; "
            "leave lm_head out of the targets"
        )
    chosen = [
        (name, m)
        for name, m in model.named_modules()
        if any(_matches(name, t) for t in wanted) and not name.startswith("aux.")
    ]
    found = {t for t in wanted for n, _ in chosen if _matches(n, t)}
    missing = sorted(explicit - found) or ([] if found else sorted(wanted))
    if missing:
        raise ValueError(f"LoRA target(s) {', '.join(missing)}: no such layer in this model")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in chosen:
        add_lora(m, r, alpha, dropout, rslora, name=name)
    return [name for name, _ in chosen]


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """Every LoRA layer of `model` by module name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}


def lora_settings(model: nn.Module) -> dict[str, Any]:
    """The one (r, alpha, rslora) every LoRA layer of `model` shares; ValueError when mixed
    or when the model has none."""
    seen = {(m.r, m.lora_alpha, m.rslora) for m in lora_layers(model).values()}
    if len(seen) != 1:
        raise ValueError(f"expected one LoRA setting across layers, found {sorted(seen) or 'none'}")
    r, alpha, rslora = seen.pop()
    return {"r": r, "alpha": alpha, "rslora": rslora}


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run `model` without its adapters inside the block (e.g. DPO's reference model)."""
    layers = list(lora_layers(model).values())
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, b in zip(layers, before, strict=True):
            m.disabled = b


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (in place); returns the merged names."""
    names = list(lora_layers(model))
    for m in lora_layers(model).values():
        m.merge()
    return names


def trainable_params(model: nn.Module) -> tuple[int, int]:
    """(parameters that require grad, all parameters), tied parameters counted once."""
    params = list(model.parameters())  # nn.Module.parameters() lists a tied tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe_lora(model: nn.Module) -> dict[str, Any] | None:
    """The `lora` block of a checkpoint's config.json for a model saved with unmerged LoRA
    layers (None without any), so `load_model` rebuilds them before loading the weights."""
    layers = lora_layers(model)
    if not layers:
        return None
    first = next(iter(layers.values()))
    return {
        **lora_settings(model),
        "dropout": getattr(first.lora_dropout, "p", 0.0),
        "modules": list(layers),
    }


def rebuild_lora(model: nn.Module, block: dict[str, Any]) -> None:
    """Inverse of `describe_lora`: give the named modules of `model` (usually on the meta
    device) their LoRA layers back."""
    modules = dict(model.named_modules())
    for name in block["modules"]:
        if name not in modules:
            raise ValueError(f"config.json lora.modules: the model has no layer {name!r}")
        add_lora(modules[name], block["r"], block["alpha"], block.get("dropout", 0.0),
                 block.get("rslora", False), name=name)  # fmt: skip


def _register() -> None:
    from llmctl.model.io import register_swap

    register_swap("lora", rebuild_lora, describe_lora)


_register()
