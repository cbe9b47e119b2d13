"""`simpo`: SimPO (Meng et al. 2024): length-normalised log-probs and a target margin gamma,
no reference model.

    reward(y) = beta * log pi(y|x) / |y|
    loss = -log sigmoid(reward(chosen) - reward(rejected) - gamma)
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from bastion.config.schema import PreferenceConfig
from bastion.train.tasks.base import Stats, register_task
from bastion.train.tasks.preference import PairLoss, PreferenceTask, SequenceLogprobs, reward_stats, sigmoid_loss


def simpo_loss(policy: SequenceLogprobs, *, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, Stats]:
    """SimPO: length-normalised log-probs, a target margin gamma, no reference model."""
    chosen_reward = beta * policy.chosen / policy.chosen_tokens.clamp(min=1)
    rejected_reward = beta * policy.rejected / policy.rejected_tokens.clamp(min=1)
    return (sigmoid_loss(chosen_reward - rejected_reward - gamma, label_smoothing),
            reward_stats(chosen_reward, rejected_reward))


def simpo_pair_loss(pc: PreferenceConfig) -> PairLoss:
    def loss(policy: SequenceLogprobs, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        return simpo_loss(policy, beta=pc.beta, gamma=pc.simpo_gamma, label_smoothing=pc.label_smoothing)

    return loss


@register_task
class SimPOTask(PreferenceTask):
    objective = "simpo"

    def pair_loss(self, reference: torch.Tensor | None) -> PairLoss:
        return simpo_pair_loss(self.cfg.finetune.preference)
