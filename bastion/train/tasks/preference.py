"""Preference alignment on pairs (prompt, chosen, rejected): what DPO, SimPO and their
relatives share - summed response log-probabilities, the sigmoid loss on a reward margin,
the statistics alignment runs are judged by, and validation over held-out pairs.

    loss = -log sigmoid(z),  z = reward(chosen) - reward(rejected) - margin

`label_smoothing` eps is the conservative variant: the preference label is assumed wrong
with probability eps, loss = (1 - eps) * l(z) + eps * l(-z). Each objective (dpo.py,
simpo.py) defines its reward and builds a `PairLoss` from it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F

from bastion.config.schema import BastionConfig
from bastion.data.batches import PlannedDataset, batch_to_device
from bastion.data.finetune import IGNORE_INDEX, PreferenceDataset, load_preferences
from bastion.errors import DataError
from bastion.train.distributed import sum_across_ranks
from bastion.train.tasks.base import Autocast, Forward, Stats
from bastion.train.tasks.files import FileTask, eval_batches

if TYPE_CHECKING:
    from bastion.train.checkpoints import StartPoint


class SequenceLogprobs(NamedTuple):
    chosen: torch.Tensor  # [B] summed log-probability of the chosen response tokens
    rejected: torch.Tensor  # [B]
    chosen_tokens: torch.Tensor  # [B] how many tokens were summed (SimPO divides by it)
    rejected_tokens: torch.Tensor  # [B]


# (policy log-probs, the batch) -> (loss, stats); a batch's "index" rows name its pairs.
# (The reward objective passes its PairScores instead of log-probs: PreferenceTask.pair_values.)
PairLoss = Callable[[Any, Mapping[str, torch.Tensor]], tuple[torch.Tensor, Stats]]
# (model or its wrapper, a batch) -> what a PairLoss reads (sequence_logprobs by default)
PairValues = Callable[[Forward, Mapping[str, torch.Tensor]], Any]
# (model, batch) -> [B, 2] summed log-probs to keep as a reference table.
Columns = Callable[[Forward, Mapping[str, torch.Tensor]], torch.Tensor]


def summed_logprobs(model: Forward, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B] summed log-probability of each row's counted tokens in float32, [B] how many),
    from one forward pass over already-shifted (ids, labels)."""
    out = model(ids)
    logits = out[0] if isinstance(out, (tuple, list)) else out
    token_logp = -F.cross_entropy(
        logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(labels)
    counted = labels != IGNORE_INDEX
    return (token_logp * counted).sum(-1), counted.sum(-1)


def sequence_logprobs(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> SequenceLogprobs:
    """Summed response log-probabilities of a preference batch, with chosen and rejected run
    as one forward pass of 2B rows. Gradients flow unless called under torch.no_grad()
    (as for the DPO reference model)."""
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    sums, counts = summed_logprobs(model, ids, labels)
    b = batch["chosen_ids"].size(0)
    return SequenceLogprobs(sums[:b], sums[b:], counts[:b], counts[b:])


def pair_columns(forward: Forward, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[B, 2] summed log-probs (chosen, rejected) of a preference batch: DPO's reference."""
    logps = sequence_logprobs(forward, batch)
    return torch.stack([logps.chosen, logps.rejected], dim=1)


def sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    loss = -F.logsigmoid(z) * (1.0 - label_smoothing)
    if label_smoothing:
        loss = loss - F.logsigmoid(-z) * label_smoothing
    return loss.mean()


def reward_stats(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor) -> Stats:
    """Detached per-batch means: reward accuracy (how often the chosen response gets the
    higher implicit reward), the margin between the two rewards, and each reward."""
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    return {
        "reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
        "reward_margin": (chosen_reward - rejected_reward).mean(),
        "reward_chosen": chosen_reward.mean(),
        "reward_rejected": rejected_reward.mean(),
    }


@torch.no_grad()
def reference_logprobs(forward: Forward, dataset: PlannedDataset, *, batch_size: int, seq_len: int,
                       device: torch.device, autocast: Autocast, rank: int = 0, world: int = 1,
                       columns: Columns = pair_columns) -> torch.Tensor:
    """[N, 2] summed log-probs of every example under the current weights (`columns` says
    which two: a pair's chosen and rejected by default), in float32 on `device`: a
    reference, computed once. With several ranks each computes every world-th batch with
    its own (unsharded, unwrapped) model and the results are summed, so every rank ends
    with the whole table."""
    out = torch.zeros(len(dataset), 2, dtype=torch.float32, device=device)
    for i, rows in enumerate(dataset.plan(batch_size, seq_len, seed=0, epoch=0, shuffle=False)):
        if i % world != rank:
            continue
        batch = batch_to_device(dataset.collate(rows, seq_len), device)
        with autocast():
            out[batch["index"]] = columns(forward, batch).float()
    return sum_across_ranks(out, world)


@torch.no_grad()
def evaluate_preferences(forward: Forward, dataset: PreferenceDataset, loss: PairLoss, *, batch_size: int,
                         seq_len: int, device: torch.device, autocast: Autocast, max_batches: int | None = None,
                         rank: int = 0, world: int = 1, values: PairValues = sequence_logprobs) -> dict[str, float]:
    """Pair-weighted means of the loss and its statistics over held-out pairs (under
    torchrun each rank takes its rows of every batch); `values` computes what the loss reads."""
    names: list[str] = []
    sums = None
    for batch, real in eval_batches(dataset, batch_size, seq_len, max_batches, rank, world, device):
        with autocast():
            value, stats = loss(values(forward, batch), batch)
        numbers = {"loss": value, **stats}
        names = list(numbers)
        n = len(batch["index"]) if real else 0
        row = torch.stack([v.detach().double() * n for v in numbers.values()]
                          + [torch.tensor(n, dtype=torch.float64, device=device)])
        sums = row if sums is None else sums + row
    if sums is None:
        raise DataError("no preference pairs to evaluate")
    *totals, pairs = sum_across_ranks(sums, world).tolist()
    return {name: total / pairs for name, total in zip(names, totals)} | {"pairs": pairs}


class PreferenceTask(FileTask):
    """Preference JSONL; subclasses build the loss (`pair_loss`) and may prepare a reference."""

    load = staticmethod(load_preferences)

    def __init__(self, cfg: BastionConfig, start: StartPoint, *, rank: int = 0, world: int = 1):
        super().__init__(cfg, start, rank=rank, world=world)
        self.rank_batch_size = cfg.train.batch_size
        self.reference: torch.Tensor | None = None  # [N, 2] per training pair, when the loss needs one
        self.val_reference: torch.Tensor | None = None

    def pair_loss(self, reference: torch.Tensor | None) -> PairLoss:
        """The objective's loss, given the reference log-probs of the pairs it will see."""
        raise NotImplementedError

    def pair_values(self, forward: Forward, batch: Mapping[str, torch.Tensor]) -> Any:
        """What the pair loss reads from the model: summed response log-probs (DPO, SimPO)."""
        return sequence_logprobs(forward, batch)

    def reference_tables(self, forward: Forward, device: torch.device, autocast: Autocast) -> None:
        """Fill `reference` / `val_reference` with every pair's log-probs under the current
        weights (batches of one rank's size, shared out among the ranks)."""
        kwargs = dict(batch_size=self.rank_batch_size, seq_len=self.seq_len, device=device, autocast=autocast,
                      rank=self.rank, world=self.world)
        self.reference = reference_logprobs(forward, self.train, **kwargs)
        if self.val is not None:
            self.val_reference = reference_logprobs(forward, self.val, **kwargs)

    def batch_unit(self) -> str:
        return f"pairs of up to {self.seq_len} tokens"

    def micro_batch_loss(self, forward: Forward, device: torch.device) -> tuple[torch.Tensor, int, Stats]:
        full, mine, real = self._next_rows()
        batch = batch_to_device(mine, device)
        loss, stats = self.pair_loss(self.reference)(self.pair_values(forward, batch), batch)
        if self.world > 1:  # this rank's share of the global batch's pairs
            share = (len(mine["index"]) if real else 0) * self.world / len(full["index"])
            loss, stats = loss * share, {name: value * share for name, value in stats.items()}
        return loss, int(full["num_tokens"]), stats

    def evaluate(self, forward: Forward, autocast: Autocast, device: torch.device, max_batches: int) -> dict[str, float]:
        assert self.val is not None
        return evaluate_preferences(forward, self.val, self.pair_loss(self.val_reference), batch_size=self.batch_size,
                                    seq_len=self.seq_len, device=device, autocast=autocast, max_batches=max_batches,
                                    rank=self.rank, world=self.world, values=self.pair_values)

    def summary(self, metrics: dict[str, float]) -> str:
        if "reward_accuracy" not in metrics:
            return ""
        return f", reward accuracy {metrics['reward_accuracy']:.3f}, margin {metrics['reward_margin']:.3f}"
