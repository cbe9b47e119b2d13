"""Deterministic, resumable batches: the one place a run's data order lives.

    BlockSampler   pretraining: fixed-length blocks from token shards (bastion/data/shards.py)
    BatchCursor    fine-tuning: the batches a dataset plans per epoch (bastion/data/finetune.py)

Both are pure functions of (seed, epoch, position) and the data, so a resumed run sees
exactly the batches the uninterrupted run would have seen; their `state_dict` is that
cursor, plus what must not change for it to mean the same thing (block count, sequence
length, or the fine-tuning data's fingerprint and batch settings).

BlockSampler: the token stream is cut into blocks of seq_len + 1 tokens that overlap by one
(so every token is a target exactly once per epoch). Each epoch visits every block once in
a permutation seeded by (seed, epoch).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np
import torch

from bastion.errors import DataError


class PlannedDataset(Protocol):
    """What BatchCursor walks (SFTDataset, PreferenceDataset)."""

    kind: str

    def __len__(self) -> int: ...

    def plan(self, batch_size: int, seq_len: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[list[int]]]: ...

    def collate(self, rows: list[list[int]], seq_len: int) -> dict[str, torch.Tensor]: ...

    def fingerprint(self) -> str: ...


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


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Tensors to `device`; the `num_tokens` count stays on the CPU (reading it must not sync a GPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return {k: v if k == "num_tokens" else v.pin_memory().to(dev, non_blocking=True) for k, v in batch.items()}
    return {k: v if k == "num_tokens" else v.to(dev) for k, v in batch.items()}


class BatchCursor:
    """Walks a dataset's per-epoch plans: `next_batch()` returns the batch at (epoch,
    position) and advances; `state_dict()`/`load_state_dict()` resume exactly (refusing a
    different dataset or batch settings)."""

    def __init__(self, dataset: PlannedDataset, batch_size: int, seq_len: int, seed: int, shuffle: bool = True):
        self.dataset, self.batch_size, self.seq_len, self.seed, self.shuffle = dataset, batch_size, seq_len, seed, shuffle
        self.epoch = 0
        self.position = 0
        self._plan: list[list[list[int]]] | None = None
        self._plan_epoch = -1
        self.current_plan()  # validates seq_len against the data now, not at the first step

    def current_plan(self) -> list[list[list[int]]]:
        if self._plan_epoch != self.epoch:
            self._plan = self.dataset.plan(self.batch_size, self.seq_len, self.seed, self.epoch, self.shuffle)
            self._plan_epoch = self.epoch
        assert self._plan is not None
        return self._plan

    @property
    def batches_per_epoch(self) -> int:
        """Batches in the current epoch (packing can change it slightly between epochs)."""
        return len(self.current_plan())

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / self.batches_per_epoch

    def next_batch(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        plan = self.current_plan()
        rows = plan[self.position]
        self.position += 1
        if self.position == len(plan):
            self.epoch, self.position = self.epoch + 1, 0
        return batch_to_device(self.dataset.collate(rows, self.seq_len), device)

    def _identity(self) -> dict[str, Any]:
        return {"kind": self.dataset.kind, "fingerprint": self.dataset.fingerprint(), "n_examples": len(self.dataset),
                "batch_size": self.batch_size, "seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, **self._identity()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self._identity()
        changed = [k for k, v in mine.items() if state.get(k) != v]
        if changed:
            raise DataError(
                "the fine-tuning data or batch settings changed since the checkpoint was written "
                f"({', '.join(changed)} differ); exact resume needs the same data and settings"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        self.epoch, self.position = epoch, 0
        if not 0 <= position < self.batches_per_epoch:
            raise DataError(f"resume position {position} is outside epoch {epoch} ({self.batches_per_epoch} batches)")
        self.position = position
