"""The reward registry: named, typed, documented reward functions, configured in YAML.

A reward scores completions. It is a `Reward` subclass registered under a name with
`@register_reward`; its parameters are a pydantic model (`Params`, unknown keys refused,
every value bounded) built from the keys written beside its name in a config:

    rewards:
      - name: math                 # numeric / LaTeX equivalence with the record's "answer"
        weight: 1.0
      - name: regex
        weight: 0.2
        pattern: "<think>.*</think>\\s*<answer>.*</answer>"

A config names functions that ship with Bastion (or with a package the user installed, see
below) and passes them data; it never carries code: no code strings, no import paths, no
`eval`/`exec` of configs or data. `build_rewards` turns the specs into a `RewardSet`, the
weighted sum of its rewards, which GRPO (`train/tasks/grpo.py`) and `bastion eval generate`
both use.

Third-party rewards come only from installed Python packages that declare an entry point in
the `bastion.rewards` group (name -> a `Reward` subclass). Installing such a package is the
trust decision, exactly as for any library Bastion imports; a config can only name it.
Entry points are looked up only when a config names a reward Bastion does not ship, and a
third-party reward can never replace a built-in one.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError

from bastion.errors import ConfigError

ENTRY_POINT_GROUP = "bastion.rewards"
MAX_REWARDS = 16  # rewards in one weighted sum


@dataclass(frozen=True)
class Sample:
    """One completion to score, with everything a reward may read about it."""

    completion: str  # the generated text (stop strings removed)
    record: Mapping[str, Any] = field(default_factory=dict)  # the prompt's JSONL record: "answer", "tests", "schema", ...
    prompt: str = ""  # the prompt as text (a chat prompt rendered by its template)
    completion_tokens: int = 0
    max_new_tokens: int = 0  # the limit the completion was generated under
    finish_reason: str = "stop"  # "stop" (eos or a stop string) or "length" (cut at max_new_tokens)


class Reward:
    """A reward function. Subclasses set `name`, document themselves in their docstring (the
    first line is what `bastion eval rewards` lists), may define `Params`, and implement
    `score_one` (or `score`, to score a batch at once, e.g. a reward model)."""

    name: ClassVar[str]

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, params: BaseModel):
        self.params = params

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [self.score_one(sample) for sample in samples]

    def score_one(self, sample: Sample) -> float:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the reward holds (a model, worker processes)."""


REWARDS: dict[str, type[Reward]] = {}


def register_reward(cls: type[Reward]) -> type[Reward]:
    """Class decorator: make `cls` the reward named `cls.name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or not name.islower():
        raise ValueError(f"{cls.__name__}.name must be a lower-case identifier")
    if REWARDS.get(name, cls) is not cls:
        raise ValueError(f"reward {name!r} is already registered by {REWARDS[name].__name__}")
    REWARDS[name] = cls
    return cls


def reward_class(name: str, where: str = "reward") -> type[Reward]:
    """The reward registered as `name`: built in, else from an installed entry point."""
    if name not in REWARDS:
        _load_entry_point(name, where)
    return REWARDS[name]


def _load_entry_point(name: str, where: str) -> None:
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not found:
        problem = (f"unknown reward {name!r}; choose one of {', '.join(sorted(REWARDS))} "
                   f"(or install a package that provides it as a {ENTRY_POINT_GROUP!r} entry point)")
        raise ConfigError(f"{where}.name: {problem}", [(f"{where}.name", problem)])
    try:
        cls = found[0].load()
    except Exception as exc:  # a broken third-party package: say which, never a traceback
        raise ConfigError(f"{where}: reward {name!r} from {found[0].value} failed to load: {type(exc).__name__}") from None
    if not (isinstance(cls, type) and issubclass(cls, Reward)):
        raise ConfigError(f"{where}: entry point {name!r} ({found[0].value}) is not a bastion Reward class")
    REWARDS[name] = cls


def entry_point_names() -> list[str]:
    """Names of the rewards installed packages declare (nothing is imported)."""
    from importlib.metadata import entry_points

    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


@dataclass
class RewardSet:
    """Weighted rewards: `score` gives each sample's total and each reward's own scores."""

    rewards: list[Reward]
    weights: list[float]
    labels: list[str]  # "name" or "name#2" when a reward appears twice

    def score(self, samples: Sequence[Sample]) -> tuple[list[float], dict[str, list[float]]]:
        parts: dict[str, list[float]] = {}
        for label, reward in zip(self.labels, self.rewards):
            scores = [float(s) for s in reward.score(samples)]
            if len(scores) != len(samples):
                raise RuntimeError(f"reward {label} returned {len(scores)} scores for {len(samples)} samples")
            parts[label] = [s if math.isfinite(s) else 0.0 for s in scores]  # a NaN reward must not poison a step
        totals = [sum(w * parts[label][i] for w, label in zip(self.weights, self.labels))
                  for i in range(len(samples))]
        return totals, parts

    def close(self) -> None:
        for reward in self.rewards:
            reward.close()


def build_reward(spec: Mapping[str, Any], where: str = "rewards[0]") -> tuple[Reward, float]:
    """One reward and its weight from a config entry {name, weight, **params}."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name: every reward needs a name", [(f"{where}.name", "missing")])
    weight = spec.pop("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not -100 <= weight <= 100:
        raise ConfigError(f"{where}.weight: must be a number between -100 and 100", [(f"{where}.weight", "out of range")])
    cls = reward_class(name, where)
    try:
        params = cls.Params(**spec)
    except ValidationError as exc:
        problems = [(".".join([where, *map(str, e["loc"])]), e["msg"]) for e in exc.errors(include_input=False)]
        raise ConfigError("; ".join(f"{loc}: {msg}" for loc, msg in problems), problems) from None
    return cls(params), float(weight)


def build_rewards(specs: Sequence[Mapping[str, Any]], where: str = "rewards") -> RewardSet:
    """A RewardSet from config entries (see the module docstring)."""
    if not specs:
        raise ConfigError(f"{where}: name at least one reward", [(where, "empty")])
    if len(specs) > MAX_REWARDS:
        raise ConfigError(f"{where}: {len(specs)} rewards, over the limit of {MAX_REWARDS}", [(where, "too many")])
    rewards, weights, labels = [], [], []
    for i, spec in enumerate(specs):
        reward, weight = build_reward(spec, f"{where}[{i}]")
        rewards.append(reward)
        weights.append(weight)
        count = sum(1 for r in rewards if r.name == reward.name)
        labels.append(reward.name if count == 1 else f"{reward.name}#{count}")
    return RewardSet(rewards, weights, labels)


__all__ = ["ENTRY_POINT_GROUP", "REWARDS", "Reward", "RewardSet", "Sample", "build_reward", "build_rewards",
           "entry_point_names", "register_reward", "reward_class"]
