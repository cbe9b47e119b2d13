"""Named model shapes. vocab_size is left unset: it comes from the tokenizer.

Parameter counts below are for a vocab of 8192 with tied embeddings (the defaults):
    tiny   ~0.6M   (0.1M non-embedding), for tests
    mini   ~3.1M   (1.6M non-embedding)
    small  ~13.8M  (10.6M non-embedding; ~23M with a 32k vocab)
    base   ~91M    (85M non-embedding; ~124M with GPT-2's 50257 vocab, GPT-2 small class)
"""
from __future__ import annotations

from typing import Any

from bastion.config.schema import ModelConfig

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=128),
    "mini": dict(d_model=192, n_layer=4, n_head=6, n_kv_head=2, max_seq_len=256),
    "small": dict(d_model=384, n_layer=6, n_head=6, max_seq_len=512),
    "base": dict(d_model=768, n_layer=12, n_head=12, max_seq_len=1024),
}


def model_config(preset: str, **overrides: Any) -> ModelConfig:
    """ModelConfig for a named preset; overrides (e.g. vocab_size=8192) win over the preset."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[preset], **overrides})
