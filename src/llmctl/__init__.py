"""llmctl: build a language model end to end from raw text, one artifact per stage."""

__version__ = "0.1.0"
