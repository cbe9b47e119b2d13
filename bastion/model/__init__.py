"""Decoder-only transformer (Llama architecture) and its named presets."""
from bastion.model.presets import PRESETS, model_config
from bastion.model.transformer import KVCache, RMSNorm, Transformer

__all__ = ["KVCache", "PRESETS", "RMSNorm", "Transformer", "model_config"]
