"""What one training step reads and which loss it computes, per objective.

    clm     token shards from `bastion data prepare`; next-token loss on every token
    sft     chat JSONL; next-token loss on assistant tokens; packed rows never attend
            across examples (segment_ids)
    dpo     preference JSONL; sigmoid DPO against reference log-probs that are computed
            once, before the first step, with the starting weights, and kept as two numbers
            per pair, so no reference model stays in memory during training
    simpo   preference JSONL; SimPO, reference-free

Every task offers the same small surface to the loop (train/loop.py): `micro_batch_loss`,
`evaluate`, `state_dict` / `load_state_dict` (exact resume) and `epochs_done`.

Under torchrun every rank walks the same global batches (train.batch_size x ranks) and
computes the loss of its own rows, weighted by its share of the global batch's tokens (sft)
or pairs (dpo, simpo): the gradients the ranks average are then exactly those of one
process with the global batch, and validation is split the same way and summed.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

from bastion.config.schema import BastionConfig
from bastion.data.finetune import (
    IGNORE_INDEX,
    batch_to_device,
    PreferenceDataset,
    SFTDataset,
    load_preferences,
    load_sft,
    sequence_logprobs,
)
from bastion.data.shards import TokenShards
from bastion.errors import DataError
from bastion.tokenizer.chat import ChatFormat
from bastion.train.batches import BlockSampler
from bastion.train.distributed import split_rows, sum_across_ranks
from bastion.train.objectives import dpo_loss, simpo_loss

Forward = Callable[..., Any]
Autocast = Callable[[], AbstractContextManager]
Stats = dict[str, torch.Tensor]


class CLMTask:
    """Pretraining: random blocks of `seq_len` tokens from the prepared shards."""

    def __init__(self, cfg: BastionConfig, train_shards: TokenShards, val_shards: TokenShards, *,
                 rank: int = 0, world: int = 1):
        tc = cfg.train
        self.batch_size, self.seq_len = tc.batch_size, tc.seq_len
        self.rank, self.world = rank, world
        self.sampler = BlockSampler(train_shards, tc.seq_len, tc.seed)
        self.val_shards = val_shards
        self.has_val = val_shards.num_tokens > tc.seq_len
        self.n_examples = self.sampler.n_blocks

    def micro_batch_loss(self, forward: Forward, device: torch.device) -> tuple[torch.Tensor, int, Stats]:
        # Every rank walks the same order and takes its slice of the global batch: disjoint
        # data, and the same batches as one process with batch_size * world.
        blocks = self.sampler.next_blocks(self.batch_size * self.world)
        mine = blocks[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        x, y = self.sampler.read_blocks(mine, device)
        _, loss = forward(x, y)
        return loss, x.numel() * self.world, {}

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


# ---- supervised fine-tuning ----------------------------------------------------------------


def sft_batch_loss(forward: Forward, batch: dict[str, torch.Tensor], packed: bool) -> torch.Tensor:
    """Mean loss over the batch's counted tokens. Packed rows pass segment_ids (attention
    stays inside each example); unpacked rows are right-padded, which causal attention
    already ignores, so they keep the fast is_causal path."""
    segments = batch["segment_ids"] if packed else None
    _, loss = forward(batch["input_ids"], batch["labels"], segment_ids=segments)
    return loss


def _eval_batches(dataset: SFTDataset | PreferenceDataset, batch_size: int, seq_len: int, max_batches: int | None,
                  rank: int, world: int, device: torch.device) -> Iterator[tuple[dict[str, torch.Tensor], bool]]:
    """(this rank's rows of each batch, real) over the first max_batches batches, file order."""
    for i, rows in enumerate(dataset.plan(batch_size, seq_len, seed=0, epoch=0, shuffle=False)):
        if max_batches is not None and i >= max_batches:
            break
        batch, real = split_rows(dataset.collate(rows, seq_len), rank, world)
        yield batch_to_device(batch, device), real


@torch.no_grad()
def evaluate_sft(forward: Forward, dataset: SFTDataset, *, batch_size: int, seq_len: int, device: torch.device,
                 autocast: Autocast, max_batches: int | None = None, rank: int = 0, world: int = 1) -> dict[str, float]:
    """Token-weighted loss and perplexity over the (first max_batches batches of the)
    dataset, in file order; under torchrun each rank takes its rows of every batch."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss x tokens, tokens
    for batch, real in _eval_batches(dataset, batch_size, seq_len, max_batches, rank, world, device):
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


class _FileTask:
    """A fine-tuning task over JSONL files: train (and optional val) data, walked by a cursor."""

    def __init__(self, cfg: BastionConfig, chat: ChatFormat, load: Callable[..., Any], *, rank: int = 0, world: int = 1):
        ft, tc = cfg.finetune, cfg.train
        roots = cfg.data.allowed_roots
        self.rank, self.world = rank, world
        # Batches are global (every rank's rows); each rank computes the loss of its share.
        self.batch_size, self.seq_len = tc.batch_size * world, tc.seq_len
        self.train = load(ft.train_file, chat, ft, roots)
        self.val = load(ft.val_file, chat, ft, roots, what="finetune.val_file") if ft.val_file else None
        self.has_val = self.val is not None
        self.cursor = self.train.cursor(self.batch_size, tc.seq_len, tc.seed)
        if self.val is not None:
            self.val.cursor(self.batch_size, tc.seq_len, 0)  # checks every val example fits seq_len now
        self.n_examples = len(self.train)
        self.batches_per_epoch = self.cursor.batches_per_epoch

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


class SFTTask(_FileTask):
    def __init__(self, cfg: BastionConfig, chat: ChatFormat, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, chat, load_sft, rank=rank, world=world)

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


# ---- preference alignment ------------------------------------------------------------------


@torch.no_grad()
def reference_logprobs(forward: Forward, dataset: PreferenceDataset, *, batch_size: int, seq_len: int,
                       device: torch.device, autocast: Autocast, rank: int = 0, world: int = 1) -> torch.Tensor:
    """[N, 2] summed log-probs (chosen, rejected) of every pair under the current weights,
    in float32 on `device`: the DPO reference, computed once. With several ranks each
    computes every world-th batch with its own (unsharded, unwrapped) model and the results
    are summed, so every rank ends with the whole table."""
    out = torch.zeros(len(dataset), 2, dtype=torch.float32, device=device)
    for i, rows in enumerate(dataset.plan(batch_size, seq_len, seed=0, epoch=0, shuffle=False)):
        if i % world != rank:
            continue
        batch = batch_to_device(dataset.collate(rows, seq_len), device)
        with autocast():
            logps = sequence_logprobs(forward, batch)
        out[batch["index"], 0] = logps.chosen.float()
        out[batch["index"], 1] = logps.rejected.float()
    return sum_across_ranks(out, world)


def preference_batch_loss(forward: Forward, batch: dict[str, torch.Tensor], objective: str, cfg: BastionConfig,
                          reference: torch.Tensor | None) -> tuple[torch.Tensor, Stats]:
    pc = cfg.finetune.preference
    logps = sequence_logprobs(forward, batch)
    if objective == "dpo":
        assert reference is not None
        ref = reference[batch["index"]]
        return dpo_loss(logps, ref[:, 0], ref[:, 1], beta=pc.beta, label_smoothing=pc.label_smoothing)
    return simpo_loss(logps, beta=pc.beta, gamma=pc.simpo_gamma, label_smoothing=pc.label_smoothing)


@torch.no_grad()
def evaluate_preferences(forward: Forward, dataset: PreferenceDataset, objective: str, cfg: BastionConfig, *,
                         reference: torch.Tensor | None, batch_size: int, seq_len: int, device: torch.device,
                         autocast: Autocast, max_batches: int | None = None, rank: int = 0,
                         world: int = 1) -> dict[str, float]:
    """Pair-weighted means of the loss, reward accuracy and margins over held-out pairs
    (under torchrun each rank takes its rows of every batch)."""
    names: list[str] = []
    sums = None
    for batch, real in _eval_batches(dataset, batch_size, seq_len, max_batches, rank, world, device):
        with autocast():
            loss, stats = preference_batch_loss(forward, batch, objective, cfg, reference)
        values = {"loss": loss, **stats}
        names = list(values)
        n = len(batch["index"]) if real else 0
        row = torch.stack([v.detach().double() * n for v in values.values()]
                          + [torch.tensor(n, dtype=torch.float64, device=device)])
        sums = row if sums is None else sums + row
    if sums is None:
        raise DataError("no preference pairs to evaluate")
    *totals, pairs = sum_across_ranks(sums, world).tolist()
    return {name: total / pairs for name, total in zip(names, totals)} | {"pairs": pairs}


class PreferenceTask(_FileTask):
    def __init__(self, cfg: BastionConfig, chat: ChatFormat, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, chat, load_preferences, rank=rank, world=world)
        self.rank_batch_size = cfg.train.batch_size
        self.cfg, self.objective = cfg, cfg.train.objective
        self.reference: torch.Tensor | None = None
        self.val_reference: torch.Tensor | None = None

    def prepare_reference(self, forward: Forward, device: torch.device, autocast: Autocast) -> None:
        """DPO: log-probs of every train and val pair under the starting weights. Call with
        the model holding exactly those weights, in eval mode (no dropout)."""
        if self.objective != "dpo":
            return
        # Batches of one rank's size (what fits its memory), shared out among the ranks.
        kwargs = dict(batch_size=self.rank_batch_size, seq_len=self.seq_len, device=device, autocast=autocast,
                      rank=self.rank, world=self.world)
        self.reference = reference_logprobs(forward, self.train, **kwargs)
        if self.val is not None:
            self.val_reference = reference_logprobs(forward, self.val, **kwargs)

    def micro_batch_loss(self, forward: Forward, device: torch.device) -> tuple[torch.Tensor, int, Stats]:
        full, mine, real = self._next_rows()
        loss, stats = preference_batch_loss(forward, batch_to_device(mine, device), self.objective, self.cfg,
                                            self.reference)
        if self.world > 1:  # this rank's share of the global batch's pairs
            share = (len(mine["index"]) if real else 0) * self.world / len(full["index"])
            loss, stats = loss * share, {name: value * share for name, value in stats.items()}
        return loss, int(full["num_tokens"]), stats

    def evaluate(self, forward: Forward, autocast: Autocast, device: torch.device, max_batches: int) -> dict[str, float]:
        assert self.val is not None
        return evaluate_preferences(forward, self.val, self.objective, self.cfg, reference=self.val_reference,
                                    batch_size=self.batch_size, seq_len=self.seq_len, device=device,
                                    autocast=autocast, max_batches=max_batches, rank=self.rank, world=self.world)


__all__ = ["CLMTask", "PreferenceTask", "SFTTask", "evaluate_preferences", "evaluate_sft", "preference_batch_loss",
           "reference_logprobs", "sft_batch_loss"]
