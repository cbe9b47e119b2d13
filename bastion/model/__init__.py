"""Decoder-only transformer (Llama architecture); named shapes are in bastion/config/presets.py."""
from bastion.model.transformer import KVCache, RMSNorm, Transformer

__all__ = ["KVCache", "RMSNorm", "Transformer"]
