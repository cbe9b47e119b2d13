"""`dpo`: sigmoid DPO (Rafailov et al. 2023) against reference log-probs computed once,
before the first step, with the starting weights, and kept as two numbers per pair: no
reference model stays in memory during training.

    reward(y) = beta * (log pi(y|x) - log pi_ref(y|x))
    loss = -log sigmoid(reward(chosen) - reward(rejected))
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from bastion.config.schema import PreferenceConfig
from bastion.train.tasks.base import Autocast, Stats, register_task
from bastion.train.tasks.preference import PairLoss, PreferenceTask, SequenceLogprobs, reward_stats, sigmoid_loss


def dpo_loss(policy: SequenceLogprobs, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *,
             beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, Stats]:
    """Sigmoid DPO. `ref_*` are the reference model's summed log-probs of the same pairs."""
    chosen_reward = beta * (policy.chosen - ref_chosen)
    rejected_reward = beta * (policy.rejected - ref_rejected)
    return sigmoid_loss(chosen_reward - rejected_reward, label_smoothing), reward_stats(chosen_reward, rejected_reward)


def dpo_pair_loss(pc: PreferenceConfig, reference: torch.Tensor) -> PairLoss:
    """DPO against `reference` ([N, 2] log-probs of every pair, looked up by batch index)."""
    def loss(policy: SequenceLogprobs, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        ref = reference[batch["index"]]
        return dpo_loss(policy, ref[:, 0], ref[:, 1], beta=pc.beta, label_smoothing=pc.label_smoothing)

    return loss


@register_task
class DPOTask(PreferenceTask):
    objective = "dpo"

    def prepare(self, model: torch.nn.Module, device: torch.device, autocast: Autocast) -> None:
        self.reference_tables(model, device, autocast)  # the starting weights are the reference

    def pair_loss(self, reference: torch.Tensor | None) -> PairLoss:
        assert reference is not None, "prepare() computes the reference before training"
        return dpo_pair_loss(self.cfg.finetune.preference, reference)
