"""What every llmctl model provides: the contract the loop, sampler, savers and commands use.

A model type (the transformer in `gpt.py`; RWKV registers its own) is an `nn.Module` with the
members below, registered in `model/io.py` with `register_model(model_type, Config, Model)`.
Nothing else may be assumed: code that needs more (a KV cache layout, attention masks of a
particular form) asks the model through these members.

Example:
    def decode_one(model: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
        cache = model.make_cache(ids.shape[0], ids.shape[1] + 1)
        return model(ids, cache=cache, logits_to_keep=1)
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


class ModelConfig(Protocol):
    """A frozen dataclass of the architecture, stored as `config.json`."""

    vocab_size: int
    n_layer: int
    max_seq_len: int
    causal: bool
    head: str  # "lm": token logits; "score": one scalar per position (reward model)

    def to_dict(self) -> dict[str, Any]: ...


class Cache(Protocol):
    """Decoding state across forward calls: a KV cache, or a recurrent state."""

    length: int  # positions consumed so far

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes a copy of row index[i] (beam search; may change the row count)."""

    def crop(self, length: int) -> None:
        """Forget positions from `length` on (speculative rollback); a model that cannot
        (a recurrent state) raises ValueError and the sampler refuses speculation."""


@runtime_checkable
class LanguageModel(Protocol):
    """The members the rest of llmctl uses."""

    config: Any  # a ModelConfig
    blocks: nn.ModuleList  # the repeated layers: FSDP shards each, checkpointing wraps each
    tok_emb: nn.Embedding  # its weight's device and dtype are the model's
    aux: nn.ModuleDict  # trainable extras an objective attaches; never saved in checkpoints
    gradient_checkpointing: bool
    # LoRA's vocabulary (class attribute): group name ("attn", "mlp") -> target names, each a
    # dotted suffix of Linear module names ("q_proj"; RWKV's "att.key"). model/lora.py adds
    # "all" (every group) and "lm_head"; `--targets` takes these names only.
    lora_groups: dict[str, tuple[str, ...]]

    def forward(
        self,
        idx: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: Any = None,
        return_hidden: bool = False,
        hidden_layers: tuple[int, ...] | list[int] = (),
        logits_to_keep: int = 0,
    ) -> Any:
        """Logits [B, T, V] (or scores [B, T, 1]); see GPT.forward for the extras.
        `segment_ids` (packed rows: each document computed as if alone; GPT masks attention,
        RWKV restarts its state) is optional: a model whose forward lacks it is trained on
        padded rows (finetune and lora refuse packing=true, naming the setting)."""

    def make_cache(self, batch_size: int, max_len: int) -> Cache: ...

    def num_params(self, non_embedding: bool = True) -> int: ...

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), for MFU."""

    def use_decode_layout(self, batch_size: int) -> None:
        """Optional speed-up before decoding `batch_size` rows; must not change values."""

    def tie_weights(self) -> None:
        """Re-share tied parameters (after a load that assigned them separately)."""
