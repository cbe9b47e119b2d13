"""Preference losses: DPO (sigmoid) and SimPO, from summed response log-probabilities.

Both return (loss, stats) where stats are detached per-batch means of what alignment runs
are judged by: reward accuracy (how often the chosen response gets the higher implicit
reward), the margin between the two rewards, and each reward.

    DPO    reward(y) = beta * (log pi(y|x) - log pi_ref(y|x))
           loss = -log sigmoid(reward(chosen) - reward(rejected))      (Rafailov et al. 2023)
    SimPO  reward(y) = beta * log pi(y|x) / |y|                        (no reference model)
           loss = -log sigmoid(reward(chosen) - reward(rejected) - gamma)   (Meng et al. 2024)

`label_smoothing` eps is the conservative variant: the preference label is assumed wrong
with probability eps, loss = (1 - eps) * l(z) + eps * l(-z).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bastion.data.finetune import SequenceLogprobs


def _sigmoid_loss(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    loss = -F.logsigmoid(z) * (1.0 - label_smoothing)
    if label_smoothing:
        loss = loss - F.logsigmoid(-z) * label_smoothing
    return loss.mean()


def _stats(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor) -> dict[str, torch.Tensor]:
    chosen_reward, rejected_reward = chosen_reward.detach(), rejected_reward.detach()
    return {
        "reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
        "reward_margin": (chosen_reward - rejected_reward).mean(),
        "reward_chosen": chosen_reward.mean(),
        "reward_rejected": rejected_reward.mean(),
    }


def dpo_loss(policy: SequenceLogprobs, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *,
             beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO. `ref_*` are the reference model's summed log-probs of the same pairs."""
    chosen_reward = beta * (policy.chosen - ref_chosen)
    rejected_reward = beta * (policy.rejected - ref_rejected)
    return _sigmoid_loss(chosen_reward - rejected_reward, label_smoothing), _stats(chosen_reward, rejected_reward)


def simpo_loss(policy: SequenceLogprobs, *, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO: length-normalised log-probs, a target margin gamma, no reference model."""
    chosen_reward = beta * policy.chosen / policy.chosen_tokens.clamp(min=1)
    rejected_reward = beta * policy.rejected / policy.rejected_tokens.clamp(min=1)
    return _sigmoid_loss(chosen_reward - rejected_reward - gamma, label_smoothing), _stats(chosen_reward, rejected_reward)


__all__ = ["dpo_loss", "simpo_loss"]
