"""Data pipeline: raw text files -> tokenizer + verified, memory-mapped token shards."""
from bastion.data.prepare import PrepareReport, SplitReport, prepare_dataset
from bastion.data.shards import TokenShards, read_index
from bastion.data.sources import Document, iter_documents, resolve_sources

__all__ = [
    "Document",
    "PrepareReport",
    "SplitReport",
    "TokenShards",
    "iter_documents",
    "prepare_dataset",
    "read_index",
    "resolve_sources",
]
