"""`sft`: supervised fine-tuning on chat JSONL; next-token loss on assistant tokens. Packed
rows never attend across examples (segment_ids)."""
from __future__ import annotations

import math

import torch

from bastion.data.batches import batch_to_device
from bastion.data.finetune import IGNORE_INDEX, SFTDataset, load_sft
from bastion.errors import DataError
from bastion.train.distributed import sum_across_ranks
from bastion.train.tasks.base import Autocast, Forward, Stats, register_task
from bastion.train.tasks.files import FileTask, eval_batches


def sft_batch_loss(forward: Forward, batch: dict[str, torch.Tensor], packed: bool) -> torch.Tensor:
    """Mean loss over the batch's counted tokens. Packed rows pass segment_ids (attention
    stays inside each example); unpacked rows are right-padded, which causal attention
    already ignores, so they keep the fast is_causal path."""
    segments = batch["segment_ids"] if packed else None
    _, loss = forward(batch["input_ids"], batch["labels"], segment_ids=segments)
    return loss


@torch.no_grad()
def evaluate_sft(forward: Forward, dataset: SFTDataset, *, batch_size: int, seq_len: int, device: torch.device,
                 autocast: Autocast, max_batches: int | None = None, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Token-weighted loss and perplexity over the (first max_batches batches of the)
    dataset, in file order; under torchrun each rank takes its rows of every batch."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x tokens, tokens
    for batch, real in eval_batches(dataset, batch_size, seq_len, max_batches, rank, world, device):
        n = int((batch["labels"] != IGNORE_INDEX).sum()) if real else 0
        if n == 0 and world == 1:
            continue  # (with several ranks every one must run the forward: FSDP gathers weights in it)
        with autocast():
            loss = sft_batch_loss(forward, batch, dataset.pack)
        if n:
            sums += torch.stack([loss.double() * n, torch.tensor(n, dtype=torch.float64, device=device)])
    total, counted = sum_across_ranks(sums, world).tolist()
    if counted == 0:
        raise DataError("no tokens to evaluate (every example's loss mask is empty)")
    mean = total / counted
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": counted}


@register_task
class SFTTask(FileTask):
    objective = "sft"
    load = staticmethod(load_sft)

    def batch_unit(self) -> str:
        return f"rows of up to {self.seq_len} tokens"

    def micro_batch_loss(self, forward: Forward, device: torch.device) -> tuple[torch.Tensor, int, Stats]:
        full, mine, real = self._next_rows()
        loss = sft_batch_loss(forward, batch_to_device(mine, device), self.train.pack)
        if self.world > 1:  # this rank's share of the global batch's counted tokens (counted on the CPU)
            counted = int((mine["labels"] != IGNORE_INDEX).sum()) if real else 0
            total = int((full["labels"] != IGNORE_INDEX).sum())  # (0: the loss is nan, as in one process)
            loss = loss * (counted * self.world / max(total, 1))
        return loss, int(full["num_tokens"]), {}

    def evaluate(self, forward: Forward, autocast: Autocast, device: torch.device, max_batches: int) -> dict[str, float]:
        assert self.val is not None
        return evaluate_sft(forward, self.val, batch_size=self.batch_size, seq_len=self.seq_len, device=device,
                            autocast=autocast, max_batches=max_batches, rank=self.rank, world=self.world)
