"""`clm`: pretraining on the token shards of `bastion data prepare`; next-token loss on every token."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from bastion.config.schema import BastionConfig
from bastion.data.batches import BlockSampler
from bastion.data.shards import TokenShards
from bastion.train.distributed import sum_across_ranks
from bastion.train.tasks.base import Autocast, Forward, Stats, Task, register_task

if TYPE_CHECKING:
    from bastion.train.checkpoints import StartPoint


@register_task
class CLMTask(Task):
    """Random blocks of `seq_len` tokens from the prepared shards (train.data_dir)."""

    objective = "clm"
    fine_tunes = False
    supports_dp = True

    def __init__(self, cfg: BastionConfig, start: StartPoint, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, start, rank=rank, world=world)
        tc = cfg.train
        data_dir = Path(tc.data_dir)
        self.batch_size, self.seq_len = tc.batch_size, tc.seq_len
        self.sampler = BlockSampler(TokenShards(data_dir, "train", verify=True), tc.seq_len, tc.seed)
        self.val_shards = TokenShards(data_dir, "val", verify=True)
        self.has_val = self.val_shards.num_tokens > tc.seq_len

    def batch_unit(self) -> str:
        return f"blocks of {self.seq_len} tokens"

    @property
    def n_examples(self) -> int:
        return self.sampler.n_blocks

    @property
    def batches_per_epoch(self) -> float:
        return self.sampler.n_blocks / (self.batch_size * self.world)

    def micro_batch_loss(self, forward: Forward, device: torch.device) -> tuple[torch.Tensor, int, Stats]:
        # Every rank walks the same order and takes its slice of the global batch: disjoint
        # data, and the same batches as one process with batch_size * world.
        blocks = self.sampler.next_blocks(self.batch_size * self.world)
        mine = blocks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        x, y = self.sampler.read_blocks(mine, device)
        _, loss = forward(x, y)
        return loss, x.numel() * self.world, {}

    def examples_loss(self, forward: Forward, examples: list[int], device: torch.device) -> tuple[torch.Tensor | None, int]:
        x, y = self.sampler.read_blocks(examples, device)
        if not len(x):
            return None, 0
        _, loss = forward(x, y)
        return loss, x.numel()

    @torch.no_grad()
    def evaluate(self, forward: Forward, autocast: Autocast, device: torch.device, max_batches: int) -> dict[str, float]:
        """Mean loss over the first `max_batches` global batches of the val shards (each rank
        its slice of every batch; the last batch wraps around to stay full)."""
        val_sampler = BlockSampler(self.val_shards, self.seq_len, seed=0, shuffle=False)
        global_batch = self.batch_size * self.world
        n = min(max_batches, math.ceil(val_sampler.n_blocks / global_batch))
        total = torch.zeros((), dtype=torch.float64, device=device)
        for _ in range(n):
            blocks = val_sampler.next_blocks(global_batch)
            x, y = val_sampler.read_blocks(blocks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size], device)
            with autocast():
                _, loss = forward(x, y)
            total += loss.double()
        return {"loss": sum_across_ranks(total, self.world).item() / (n * self.world)}

    @property
    def epochs_done(self) -> float:
        return self.sampler.epochs_done

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
