"""Verifiable reward functions: completion text (+ its record) -> a score in [0, 1].

Small, deterministic and cheap, so the generation eval (`bastion eval generate`) and later
RL objectives share them. A spec string picks one on the command line:

    exact            1 if the completion equals the record's "answer" (surrounding
                     whitespace ignored), else 0
    contains         1 if the record's "answer" occurs in the completion
    regex:PATTERN    1 if PATTERN matches the whole completion (re.fullmatch)
    length:MIN-MAX   1 if the completion has MIN..MAX characters (either side may be empty)

Patterns are compiled once and capped in size; completions are bounded by the generation
limits, which bounds the work a pattern can do.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bastion.errors import ConfigError, DataError

MAX_PATTERN_CHARS = 1000
RewardFn = Callable[[str, Mapping[str, Any]], float]


@dataclass(frozen=True)
class Reward:
    name: str  # the spec it was built from, for reports
    fn: RewardFn

    def __call__(self, completion: str, record: Mapping[str, Any]) -> float:
        return self.fn(completion, record)


def _answer(record: Mapping[str, Any], reward: str) -> str:
    answer = record.get("answer")
    if not isinstance(answer, str):
        raise DataError(f"reward {reward!r} needs a string \"answer\" in every record")
    return answer


def exact_match(completion: str, record: Mapping[str, Any]) -> float:
    return float(completion.strip() == _answer(record, "exact").strip())


def contains(completion: str, record: Mapping[str, Any]) -> float:
    return float(_answer(record, "contains").strip() in completion)


def regex_match(pattern: str) -> RewardFn:
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ConfigError(f"reward regex is {len(pattern)} characters, over the limit of {MAX_PATTERN_CHARS}")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"reward regex {pattern!r} is invalid: {exc}") from None
    return lambda completion, record: float(compiled.fullmatch(completion) is not None)


def length_between(lo: int | None, hi: int | None) -> RewardFn:
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"reward length:{lo}-{hi}: MIN is larger than MAX")
    return lambda completion, record: float((lo is None or len(completion) >= lo) and (hi is None or len(completion) <= hi))


def parse_reward(spec: str) -> Reward:
    """A Reward from its spec string (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "exact" and not arg:
        return Reward(spec, exact_match)
    if kind == "contains" and not arg:
        return Reward(spec, contains)
    if kind == "regex" and arg:
        return Reward(spec, regex_match(arg))
    if kind == "length" and re.fullmatch(r"\d{0,9}-\d{0,9}", arg) and arg != "-":
        lo, hi = arg.split("-")
        return Reward(spec, length_between(int(lo) if lo else None, int(hi) if hi else None))
    raise ConfigError(f"unknown reward {spec!r}; use exact, contains, regex:PATTERN or length:MIN-MAX")


__all__ = ["Reward", "RewardFn", "contains", "exact_match", "length_between", "parse_reward", "regex_match"]
