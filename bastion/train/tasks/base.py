"""The surface every training objective offers the loop, and the registry of objectives.

An objective is a `Task` subclass - what one step reads and which loss it computes - plus
its loss, in one file beside the others, registered under its `train.objective` name with
`@register_task`. The loop (bastion/train/loop.py) only ever talks to this surface, so a
new objective never edits the loop.

Under torchrun every rank walks the same global batches (train.batch_size x ranks) and
computes the loss of its own rows, weighted by its share of the global batch, so the
gradients the ranks average are exactly those of one process with the global batch.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from bastion.config.schema import BastionConfig
from bastion.errors import CheckpointError, ConfigError
from bastion.model.heads import scoring_config, scoring_weights

if TYPE_CHECKING:
    from bastion.train.checkpoints import StartPoint

Forward = Callable[..., Any]
Autocast = Callable[[], AbstractContextManager]
Stats = dict[str, torch.Tensor]
OBJECTIVE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


class Task:
    """One objective's data and loss. Subclasses set `objective` and implement the methods
    that raise NotImplementedError; the others have defaults that fit most objectives."""

    objective: ClassVar[str]
    fine_tunes: ClassVar[bool] = True  # starts from finetune.init_from; False: pretraining from token shards
    supports_dp: ClassVar[bool] = False  # can train under DP-SGD (needs `examples_loss`)
    has_val: bool = False

    def __init__(self, cfg: BastionConfig, start: StartPoint, *, rank: int = 0, world: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world

    # ---- before training ------------------------------------------------------------------
    @classmethod
    def adapt_start(cls, start: StartPoint, cfg: BastionConfig | None = None) -> None:
        """Called once, before the model is built, with what the run starts from and the run's
        config: a task whose model differs from its start checkpoint's changes
        `start.model_cfg` and `start.weights` here (reward.py and classify.py swap the lm head
        for a score head; classify reads its size from the config). By default the
        start must be a language model: SFT or DPO on a reward model would have no logits."""
        labels = start.model_cfg.score_labels
        if labels is None:
            return
        if start.directory is None:  # pretraining: the config's own model section
            raise ConfigError(f"model.score_labels ({labels}): train.objective {cls.objective} trains a language model; "
                              "leave it unset (train.objective reward adds the head to finetune.init_from)",
                              [("model.score_labels", "only for fine-tuning objectives that score")])
        raise CheckpointError(f"finetune.init_from {start.directory} is a reward/scoring model "
                              f"(model.score_labels={labels}) and has no lm head; train.objective {cls.objective} "
                              "needs a language model")

    def prepare(self, model: torch.nn.Module, device: torch.device, autocast: Autocast) -> None:
        """Called once per process, before any step, with the model holding the starting
        weights (init_from, also when resuming) in eval mode: e.g. DPO's reference log-probs."""

    def describe(self) -> list[str]:
        """Notes for the progress output (what was loaded, what was dropped)."""
        return []

    def batch_unit(self) -> str:
        """What a global batch is made of, for the progress output ("rows of up to 512 tokens")."""
        raise NotImplementedError

    @property
    def batches_per_epoch(self) -> float:
        """Global batches in one pass over the training data (for train.epochs)."""
        raise NotImplementedError

    # ---- steps ----------------------------------------------------------------------------
    def micro_batch_loss(self, forward: Forward, device: torch.device) -> tuple[torch.Tensor, int, Stats]:
        """The next micro-batch's loss (this rank's share), the global batch's token count,
        and detached statistics to average into the step's log line."""
        raise NotImplementedError

    def examples_loss(self, forward: Forward, examples: list[int], device: torch.device) -> tuple[torch.Tensor | None, int]:
        """DP-SGD: the mean loss of the given training examples (None when there are none)
        and their token count. Only tasks with `supports_dp`."""
        raise NotImplementedError

    @property
    def n_examples(self) -> int:
        """Training examples (DP-SGD samples each with probability batch_size / n_examples)."""
        raise NotImplementedError

    # ---- validation -----------------------------------------------------------------------
    def evaluate(self, forward: Forward, autocast: Autocast, device: torch.device, max_batches: int) -> dict[str, float]:
        """Validation numbers ("loss" first) over at most `max_batches` global batches."""
        raise NotImplementedError

    def summary(self, metrics: dict[str, float]) -> str:
        """What the progress line adds after the validation loss (", reward accuracy 0.81")."""
        return ""

    # ---- resume ---------------------------------------------------------------------------
    @property
    def epochs_done(self) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The data cursor, saved in every checkpoint for exact resume."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """After the run (also a failed one): release what the task holds (reward workers, models)."""


TASKS: dict[str, type[Task]] = {}


def start_with_score_head(start: StartPoint, size: int, needs: str) -> None:
    """A scoring task's start point: a language model's lm head becomes a zero score head of
    `size` labels; a scoring model must already have `size` (CheckpointError naming what
    `needs` them otherwise)."""
    labels = start.model_cfg.score_labels
    if labels is None:
        assert start.weights is not None, "fine-tuning starts from weights"
        start.model_cfg = scoring_config(start.model_cfg, size)
        start.weights = scoring_weights(start.weights, start.model_cfg, size)
    elif labels != size:
        raise CheckpointError(f"finetune.init_from {start.directory} scores {labels} labels (model.score_labels); "
                              f"{needs}")


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` the task of `train.objective: <cls.objective>`."""
    name = getattr(cls, "objective", None)
    if not isinstance(name, str) or not OBJECTIVE_NAME.fullmatch(name):
        raise ValueError(f"{cls.__name__}.objective must be a name like 'dpo' ({OBJECTIVE_NAME.pattern})")
    if TASKS.get(name, cls) is not cls:
        raise ValueError(f"objective {name!r} is already registered by {TASKS[name].__name__}")
    TASKS[name] = cls
    return cls


def task_class(objective: str) -> type[Task]:
    """The task registered for `objective`; ConfigError naming train.objective otherwise."""
    if objective not in TASKS:
        message = f"not a registered objective; choose one of {', '.join(sorted(TASKS))}"
        raise ConfigError(f"train.objective: {message}", [("train.objective", message)])
    return TASKS[objective]
