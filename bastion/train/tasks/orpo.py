"""`orpo`: ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without
Reference Model"): supervised fine-tuning on the chosen response and a preference term in
one loss, on preference JSONL, with no reference model (no `prepare` work at all).

    log p(y) = mean over y's tokens of log pi(token | ...)       (length-normalised)
    log odds(y) = log p(y) - log(1 - p(y))
    loss = -log p(chosen) - lambda * log sigmoid(log odds(chosen) - log odds(rejected))

lambda is finetune.preference.orpo_lambda (TRL calls it beta). The NLL term is taken per
pair (each chosen response's mean token NLL, averaged over the pairs); TRL averages over
all chosen tokens of the batch instead, which weights long responses more. Per pair keeps
the whole loss a mean over pairs, which is what `PreferenceTask` splits among ranks.

"Rewards" in the statistics are lambda * log p(y), as TRL logs them: reward accuracy is how
often the chosen response is the likelier one per token.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from bastion.config.schema import BastionConfig
from bastion.errors import ConfigError
from bastion.train.tasks.base import Stats, register_task
from bastion.train.tasks.preference import PairLoss, PreferenceTask, SequenceLogprobs, reward_stats

if TYPE_CHECKING:
    from bastion.train.checkpoints import StartPoint

# log p is clamped to at most this before log(1 - p): at log p = 0 (a response the model is
# certain of) log(1 - p) is -inf, and its slope grows like 1/|log p| as log p nears 0.
LOG_P_CEILING = -1e-6


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= LOG_P_CEILING, without cancellation: log(-expm1(x)) near 0,
    log1p(-exp(x)) below -log 2 (Maechler 2012, "Accurately computing log(1 - exp(-|a|))")."""
    x = x.clamp(max=LOG_P_CEILING)
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(policy: SequenceLogprobs, *, lam: float) -> tuple[torch.Tensor, Stats]:
    """ORPO's loss over a batch of pairs: mean over pairs of NLL(chosen) + lam * odds-ratio loss."""
    chosen = policy.chosen / policy.chosen_tokens.clamp(min=1)  # mean token log-prob
    rejected = policy.rejected / policy.rejected_tokens.clamp(min=1)
    log_odds_ratio = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio_loss = -F.logsigmoid(log_odds_ratio)
    nll = -chosen
    loss = (nll + lam * ratio_loss).mean()
    stats = reward_stats(lam * chosen, lam * rejected) | {
        "log_odds_ratio": log_odds_ratio.detach().mean(),
        "odds_ratio_loss": ratio_loss.detach().mean(),
        "nll": nll.detach().mean(),
    }
    return loss, stats


def orpo_pair_loss(lam: float) -> PairLoss:
    def loss(policy: SequenceLogprobs, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        return orpo_loss(policy, lam=lam)

    return loss


def refuse_label_smoothing(cfg: BastionConfig) -> None:
    """label_smoothing is the conservative DPO/SimPO variant; an objective without one must
    not train as if it had honoured it."""
    if cfg.finetune.preference.label_smoothing:
        field = "finetune.preference.label_smoothing"
        message = f"applies to dpo and simpo; {cfg.train.objective} has no label-smoothing variant (set it to 0)"
        raise ConfigError(f"{field}: {message}", [(field, message)])


@register_task
class ORPOTask(PreferenceTask):
    objective = "orpo"

    def __init__(self, cfg: BastionConfig, start: StartPoint, *, rank: int = 0, world: int = 1):
        refuse_label_smoothing(cfg)
        super().__init__(cfg, start, rank=rank, world=world)

    def pair_loss(self, reference: torch.Tensor | None) -> PairLoss:
        return orpo_pair_loss(self.cfg.finetune.preference.orpo_lambda)

    def summary(self, metrics: dict[str, float]) -> str:
        text = super().summary(metrics)
        return text + (f", nll {metrics['nll']:.3f}" if "nll" in metrics else "")
