"""Bastion: a secure-by-default toolkit from raw text to a served language model."""

__version__ = "0.1.0"
