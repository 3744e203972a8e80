"""Test helpers shared by the RWKV test modules."""

from __future__ import annotations

import math

import torch

from llmctl.model.rwkv import RWKV, preset


def random_model(seed: int = 0, vocab: int = 61, **kw: object) -> RWKV:
    """An RWKV whose every parameter is random (the init's zeros would hide mistakes)."""
    torch.manual_seed(seed)
    model = RWKV(preset("rwkv-tiny", vocab_size=vocab, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "time_decay" in name:
                p.uniform_(-3.0, 2.0)  # decays exp(-e^-3) .. exp(-e^2) per step
            elif "time_first" in name:
                p.uniform_(-2.0, 2.0)
            elif "time_mix" in name:
                p.uniform_(0.0, 1.0)
            elif p.dim() == 2:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
            else:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model.eval()
