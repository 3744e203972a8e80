"""The transformer (`gpt`), its checkpoints (`io`) and its transformers export (`hf`)."""

from llmctl.model.gpt import GPT, PRESETS, GPTConfig, KVCache, preset
from llmctl.model.io import load_config, load_model, save_checkpoint

__all__ = [
    "GPT",
    "PRESETS",
    "GPTConfig",
    "KVCache",
    "load_config",
    "load_model",
    "preset",
    "save_checkpoint",
]
