"""Byte-level BPE tokenizer (train, save, load, encode/decode)."""
from bastion.tokenizer.bpe import EOS_TOKEN, PAD_TOKEN, BastionTokenizer

__all__ = ["BastionTokenizer", "EOS_TOKEN", "PAD_TOKEN"]
