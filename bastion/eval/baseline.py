"""The unigram baseline: the loss of a model that ignores context and predicts each token by
its training-set frequency. A language model that has learned anything beats it."""
from __future__ import annotations

import numpy as np

CHUNK = 1 << 22


def _counts(shards, vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for start in range(0, shards.num_tokens, CHUNK):  # streaming: memory does not grow with data
        counts += np.bincount(shards.read(start, min(CHUNK, shards.num_tokens - start)), minlength=vocab_size)
    return counts


def unigram_cross_entropy(train_shards, val_shards) -> float:
    """Mean -ln p(token) over the validation tokens under add-one-smoothed train unigrams (nats)."""
    vocab = max(train_shards.vocab_size, val_shards.vocab_size)
    train_counts = _counts(train_shards, vocab)
    log_probs = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab)
    val_counts = _counts(val_shards, vocab)
    if val_counts.sum() == 0:
        raise ValueError("validation split is empty")
    return float(-(val_counts * log_probs).sum() / val_counts.sum())
