"""Deterministic, resumable batches of fixed-length blocks from token shards.

The token stream is cut into blocks of seq_len + 1 tokens that overlap by one (so every
token is a target exactly once per epoch). Each epoch visits every block once in a
permutation seeded by (seed, epoch); the cursor (epoch, position) is all the state, so a
resumed run sees exactly the batches the uninterrupted run would have seen.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bastion.errors import DataError


class BlockSampler:
    def __init__(self, shards: Any, seq_len: int, seed: int, shuffle: bool = True):
        self.shards = shards
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.n_blocks = (shards.num_tokens - 1) // seq_len
        if self.n_blocks < 1:
            raise DataError(
                f"dataset has {shards.num_tokens} tokens, fewer than one training block of seq_len+1 = {seq_len + 1}; "
                "add data or lower train.seq_len"
            )
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def _block_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_blocks)
            else:
                self._order = np.arange(self.n_blocks)
            self._order_epoch = self.epoch
        return self._order

    def next_blocks(self, count: int) -> list[int]:
        blocks = []
        while len(blocks) < count:
            order = self._block_order()
            take = min(count - len(blocks), self.n_blocks - self.position)
            blocks.extend(int(b) for b in order[self.position : self.position + take])
            self.position += take
            if self.position == self.n_blocks:
                self.epoch, self.position = self.epoch + 1, 0
        return blocks

    def batch(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Next (inputs, targets), each [batch_size, seq_len] int64."""
        return self.read_blocks(self.next_blocks(batch_size), device)

    def read_blocks(self, blocks: list[int], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the given blocks, each [len(blocks), seq_len] int64; the cursor does
        not move. DP training draws its own (Poisson) block sets and reads them through this."""
        rows = [self.shards.read(b * self.seq_len, self.seq_len + 1) for b in blocks]
        if not rows:
            empty = torch.empty((0, self.seq_len), dtype=torch.int64, device=device)
            return empty, empty
        tokens = torch.from_numpy(np.stack(rows).astype(np.int64))
        if torch.device(device).type == "cuda":
            tokens = tokens.pin_memory().to(device, non_blocking=True)
        else:
            tokens = tokens.to(device)
        return tokens[:, :-1], tokens[:, 1:]

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / self.n_blocks

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n_blocks": self.n_blocks, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n_blocks") != self.n_blocks or state.get("seq_len") != self.seq_len:
            raise DataError(
                "the dataset or train.seq_len changed since the checkpoint was written "
                f"(checkpoint: {state.get('n_blocks')} blocks of {state.get('seq_len')}, now: {self.n_blocks} of {self.seq_len}); "
                "exact resume needs the same data"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
