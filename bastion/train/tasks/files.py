"""Fine-tuning tasks over JSONL files (finetune.train_file / val_file), walked by a cursor."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from bastion.config.schema import BastionConfig
from bastion.data.batches import batch_to_device
from bastion.data.finetune import KTODataset, PreferenceDataset, SFTDataset
from bastion.train.distributed import split_rows
from bastion.train.tasks.base import Task

if TYPE_CHECKING:
    from bastion.train.checkpoints import StartPoint


def eval_batches(dataset: SFTDataset | PreferenceDataset | KTODataset, batch_size: int, seq_len: int,
                 max_batches: int | None, rank: int, world: int,
                 device: torch.device) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """(this rank's rows of each batch, real) over the first max_batches batches, file order."""
    for i, rows in enumerate(dataset.plan(batch_size, seq_len, seed=0, epoch=0, shuffle=False)):
        if max_batches is not None and i >= max_batches:
            break
        batch, real = split_rows(dataset.collate(rows, seq_len), rank, world)
        yield batch_to_device(batch, device), real


class FileTask(Task):
    """Train (and optional val) data from the fine-tuning files, tokenized with the chat
    format of the checkpoint the run starts from; `load` reads one file."""

    load: Callable[..., Any]  # staticmethod(load_sft), staticmethod(load_preferences) or staticmethod(load_kto)

    def __init__(self, cfg: BastionConfig, start: StartPoint, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, start, rank=rank, world=world)
        ft, tc = cfg.finetune, cfg.train
        roots = cfg.data.allowed_roots
        # Batches are global (every rank's rows); each rank computes the loss of its share.
        self.batch_size, self.seq_len = tc.batch_size * world, tc.seq_len
        self.train = self.load(ft.train_file, start.chat, ft, roots)
        self.val = self.load(ft.val_file, start.chat, ft, roots, what="finetune.val_file") if ft.val_file else None
        self.has_val = self.val is not None
        self.cursor = self.train.cursor(self.batch_size, tc.seq_len, tc.seed)
        if self.val is not None:
            self.val.cursor(self.batch_size, tc.seq_len, 0)  # checks every val example fits seq_len now

    @property
    def n_examples(self) -> int:
        return len(self.train)

    @property
    def batches_per_epoch(self) -> float:
        return self.cursor.batches_per_epoch

    def _next_rows(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bool]:
        """(the next global batch, this rank's rows of it, real), both on the CPU."""
        full = self.cursor.next_batch()
        mine, real = split_rows(full, self.rank, self.world)
        return full, mine, real

    def describe(self) -> list[str]:
        notes = [f"train: {self.train.report.describe()}" if self.train.report else ""]
        if self.val is not None and self.val.report is not None:
            notes.append(f"val: {self.val.report.describe()}")
        return [n for n in notes if n]

    @property
    def epochs_done(self) -> float:
        return self.cursor.epochs_done

    def state_dict(self) -> dict[str, Any]:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cursor.load_state_dict(state)
