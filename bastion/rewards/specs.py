"""Rewards named on the command line (`bastion eval generate --reward SPEC`), and the
description of a reward that `bastion eval rewards` prints.

    exact | contains | normalized | math | ...   any registered reward that needs no parameters
    regex:PATTERN                                 regex, mode fullmatch
    length:MIN-MAX                                length in characters (either side may be empty)
"""
from __future__ import annotations

import re
from typing import Any, Literal, get_args, get_origin

from pydantic_core import PydanticUndefined

from bastion.errors import ConfigError
from bastion.rewards.registry import Reward

SPEC_HELP = "NAME (a reward without required parameters, e.g. exact, contains, math) | regex:PATTERN | length:MIN-MAX"


def parse_reward_spec(spec: str, where: str = "--reward") -> dict[str, Any]:
    """The config entry ({name, **params}) a --reward spec string stands for."""
    kind, colon, arg = spec.partition(":")
    if kind == "regex" and arg:
        return {"name": "regex", "pattern": arg}
    if kind == "length" and re.fullmatch(r"\d{0,9}-\d{0,9}", arg) and arg != "-":
        lo, hi = arg.split("-")
        return {"name": "length", **({"min": int(lo)} if lo else {}), **({"max": int(hi)} if hi else {})}
    if not colon and re.fullmatch(r"[a-z][a-z0-9_]{0,63}", kind) and kind not in ("regex", "length"):
        return {"name": kind}
    raise ConfigError(f"{where}: unknown reward {spec[:200]!r}; use {SPEC_HELP}")


def describe_params(cls: type[Reward]) -> list[tuple[str, str, str]]:
    """(name, type, default) of each of a reward's parameters, as a config spells them."""
    rows = []
    for name, info in cls.Params.model_fields.items():
        if info.default_factory is not None:
            default = f"{info.get_default(call_default_factory=True)!r} (here)"  # e.g. from the CPU count
        else:
            default = "required" if info.default is PydanticUndefined else repr(info.default)
        rows.append((info.alias or name, _type_name(info.annotation), default))
    return rows


def _type_name(annotation: Any) -> str:
    if get_origin(annotation) is Literal:
        return "|".join(map(str, get_args(annotation)))
    return getattr(annotation, "__name__", None) if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def summary(cls: type[Reward]) -> str:
    """The first line of a reward's docstring."""
    return ((cls.__doc__ or "").strip().splitlines() or [""])[0]


__all__ = ["SPEC_HELP", "describe_params", "parse_reward_spec", "summary"]
