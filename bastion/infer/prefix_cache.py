"""Prefix caching: the keys/values of prompt blocks already computed, reused by later prompts
that start with the same tokens (a system prompt, a few-shot header, a chat's history).

The engine's "padded" mode prefills every prompt in aligned chunks of `block_tokens` tokens
(one forward per chunk, each attending to the cache of the positions before it). Chunk i's
keys/values are then a function of the tokens [0, (i + 1) C) only, computed with the same
shapes every time, so a block stored after one prefill holds exactly the bits a cold
prefill of the same prefix computes: a hit changes the time to first token, never the
output.

A block is keyed by a hash chain, as vLLM's block hashes: key_i = H(key_{i-1}, tokens of
block i), with key_{-1} = H(namespace). The namespace holds whatever else changes the
keys/values or must not share them: a LoRA adapter's name, an API key's id (per-key
isolation). H is BLAKE2b-128 over the token ids' bytes: prompts are attacker-controlled, so
a non-cryptographic hash would let a crafted prompt collide with another's block.

Blocks are copied into a sequence's own cache on a hit, and out of it once its prompt is
prefilled; no running sequence points into this store, so any block can be evicted at any
time. Eviction is LRU over a fixed number of preallocated blocks, a chain's blocks ordered
so that its end goes first.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from bastion.model.transformer import KVCache, Transformer


def block_keys(namespace: str, prompt: list[int], block_tokens: int) -> list[bytes]:
    """The hash chain's key of every full block of `prompt` (a partial last block has none)."""
    key = hashlib.blake2b(b"bastion-prefix\0" + namespace.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    keys = []
    for start in range(0, len(prompt) - block_tokens + 1, block_tokens):
        ids = array("q", prompt[start:start + block_tokens]).tobytes()
        key = hashlib.blake2b(key + ids, digest_size=16).digest()
        keys.append(key)
    return keys


class PrefixCache:
    """`blocks` blocks of `block_tokens` positions' keys/values, preallocated per layer as
    [blocks, n_kv_head, block_tokens, head_dim] in the engine cache's dtype."""

    def __init__(self, model: Transformer, blocks: int, block_tokens: int):
        cfg = model.cfg
        shape = (blocks, cfg.kv_heads, block_tokens, cfg.head_dim)
        like = model.new_cache(1, max_len=1)  # the dtype and device of the model's caches
        dtype, device = like.k[0].dtype, like.k[0].device
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.blocks, self.block_tokens = blocks, block_tokens
        self._where: OrderedDict[bytes, int] = OrderedDict()  # key -> block, least recently used first
        self._free = list(range(blocks - 1, -1, -1))
        # Counters for /metrics (read from other threads: plain ints, written by the engine thread only).
        self.queried_tokens = 0  # prompt tokens of the requests that looked up the cache
        self.hit_tokens = 0  # of those, tokens whose keys/values came from the cache
        self.evictions = 0

    @property
    def used(self) -> int:
        return len(self._where)

    def lookup(self, keys: list[bytes], prompt_tokens: int) -> list[int]:
        """The blocks holding the longest run of leading `keys` (most recently used now);
        counts the query. The caller reuses at most the blocks before the prompt's last
        token, whose logits must be computed."""
        found = []
        for key in keys:
            block = self._where.get(key)
            if block is None:
                break
            found.append(block)
        for key in reversed(keys[:len(found)]):  # the first block most recent: evicted last
            self._where.move_to_end(key)
        self.queried_tokens += prompt_tokens
        self.hit_tokens += len(found) * self.block_tokens
        return found

    def load(self, block: int, cache: KVCache, start: int) -> None:
        """Block `block` into a sequence's cache (batch 1) at positions [start, start + block_tokens)."""
        end = start + self.block_tokens
        for k, v, bk, bv in zip(cache.k, cache.v, self.k, self.v):
            k[0, :, start:end] = bk[block]
            v[0, :, start:end] = bv[block]

    def store(self, keys: list[bytes], cache: KVCache) -> None:
        """A prefilled prompt's full blocks (`keys`, from block_keys) from its cache (batch 1).
        Stored last block first, so that the first is the most recently used: a chain is
        evicted from its end, never its first block before its later ones (which would be
        unreachable without it)."""
        for i in reversed(range(len(keys))):
            self._store(keys[i], cache, i * self.block_tokens)

    def _store(self, key: bytes, cache: KVCache, start: int) -> None:
        """The cache's positions [start, start + block_tokens) as the block of `key`,
        evicting the least recently used block when all are taken."""
        if key in self._where:
            self._where.move_to_end(key)
            return
        if self._free:
            block = self._free.pop()
        else:
            _, block = self._where.popitem(last=False)
            self.evictions += 1
        end = start + self.block_tokens
        for k, v, bk, bv in zip(cache.k, cache.v, self.k, self.v):
            bk[block] = k[0, :, start:end]
            bv[block] = v[0, :, start:end]
        self._where[key] = block

    def stats(self) -> dict[str, int]:
        return {"queried_tokens": self.queried_tokens, "hit_tokens": self.hit_tokens, "evictions": self.evictions,
                "blocks_used": self.used, "blocks": self.blocks, "block_tokens": self.block_tokens}
