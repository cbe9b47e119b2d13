"""`reward`: a reward model (Bradley-Terry, as in InstructGPT and TRL's RewardTrainer) trained
on the preference JSONL DPO reads. The model is finetune.init_from with a scalar score head
in place of its lm head (bastion/model/heads.py: the head's value at the last non-padding
token of prompt + response), and r(x, y) is that value.

    loss = -log sigmoid(r(x, y_chosen) - r(x, y_rejected))
         + reward_center_coef * mean((r(x, y_chosen) + r(x, y_rejected))^2)

The second term (finetune.preference.reward_center_coef, default 0: off) keeps the rewards
centred on 0, which Bradley-Terry leaves free. label_smoothing applies as for DPO.
Validation reports the loss, reward accuracy (how often r_chosen > r_rejected) and margin.

Starting from a language model the lm head is dropped and a zero score head added (why
zeros: heads.scoring_weights); starting from a reward checkpoint continues training it. The
saved checkpoints record model.score_labels: 1, so every loader builds the scoring model.
LoRA is refused: the head would have to train beside the adapters and travel with them
(adapter folders, merge, PEFT export), which adapter folders do not carry yet.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch

from bastion.config.schema import BastionConfig
from bastion.errors import ConfigError
from bastion.model.heads import sequence_scores
from bastion.train.tasks.base import Forward, Stats, register_task, start_with_score_head
from bastion.train.tasks.preference import PairLoss, PreferenceTask, reward_stats, sigmoid_loss

if TYPE_CHECKING:
    from bastion.train.checkpoints import StartPoint

REWARD_LABELS = 1  # one scalar per sequence


class PairScores(NamedTuple):
    chosen: torch.Tensor  # [B] r(x, y_chosen), float32
    rejected: torch.Tensor  # [B]


def pair_scores(forward: Forward, batch: Mapping[str, torch.Tensor], pad_id: int) -> PairScores:
    """The rewards of a preference batch, chosen and rejected run as one forward of 2B rows."""
    ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
    scores = sequence_scores(forward, ids, pad_id)[:, 0].float()
    b = batch["chosen_ids"].size(0)
    return PairScores(scores[:b], scores[b:])


def reward_loss(scores: PairScores, *, label_smoothing: float = 0.0,
                center_coef: float = 0.0) -> tuple[torch.Tensor, Stats]:
    """Bradley-Terry loss of the pairs (plus the optional centring term) and reward stats."""
    loss = sigmoid_loss(scores.chosen - scores.rejected, label_smoothing)
    if center_coef:
        loss = loss + center_coef * (scores.chosen + scores.rejected).pow(2).mean()
    return loss, reward_stats(scores.chosen, scores.rejected)


@register_task
class RewardTask(PreferenceTask):
    objective = "reward"

    def __init__(self, cfg: BastionConfig, start: StartPoint, *, rank: int = 0, world: int = 1):
        if cfg.finetune.lora.enabled:
            raise ConfigError("finetune.lora.enabled: train.objective reward trains the whole model (LoRA adapters "
                              "cannot carry the score head yet); turn LoRA off",
                              [("finetune.lora.enabled", "not supported with train.objective reward")])
        super().__init__(cfg, start, rank=rank, world=world)
        self.pad_id = self.train.pad_id  # pooling reads the last token that is not padding

    @classmethod
    def adapt_start(cls, start: StartPoint, cfg: BastionConfig | None = None) -> None:
        start_with_score_head(start, REWARD_LABELS, f"a reward model has {REWARD_LABELS}")

    def pair_values(self, forward: Forward, batch: Mapping[str, torch.Tensor]) -> PairScores:
        return pair_scores(forward, batch, self.pad_id)

    def pair_loss(self, reference: torch.Tensor | None) -> PairLoss:
        pc = self.cfg.finetune.preference

        def loss(scores: PairScores, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
            return reward_loss(scores, label_smoothing=pc.label_smoothing, center_coef=pc.reward_center_coef)

        return loss
