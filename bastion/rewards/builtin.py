"""The rewards that ship with Bastion (registered on import of `bastion.rewards`).

Each reads the completion and, where it needs one, a field of the prompt's record, and
refuses a record without it (DataError naming the reward and the field). Scores are 1/0
unless the docstring says otherwise (`overlong` is a penalty, <= 0). Every one is cheap to
build: `bastion config validate` builds them all; only `math` starts a worker process, on
first use.

Bounds: Python's `re` backtracks, so `regex` looks at completions of at most `max_chars`
characters and scores longer ones 0; `math` considers only the last `max_chars` of the
answer and runs math-verify in a killable worker (mathverify.py); JSON is parsed with
`bastion.safeio.parse_json` (nesting bounded) after the same kind of size cap.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from bastion.errors import ConfigError, DataError
from bastion.rewards.registry import Reward, Sample, register_reward
from bastion.safeio import parse_json

MAX_PATTERN_CHARS = 1000
MAX_MATCH_CHARS = 1_000_000  # the largest completion cap a reward accepts
FIELD_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"  # a record field name
TAG_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,31}$"


def record_field(sample: Sample, field: str, reward: str, types: tuple[type, ...] = (str,)) -> Any:
    """record[field], which must exist and be of one of `types` (DataError naming both)."""
    value = sample.record.get(field)
    if value is None or isinstance(value, bool) or not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types)
        got = "missing" if value is None else type(value).__name__
        raise DataError(f"reward {reward!r} needs a {names} {field!r} field in every record (got {got})")
    return value


def tag_content(text: str, tag: str) -> str | None:
    """The content of the last <tag>...</tag> in `text`, or None."""
    end = text.rfind(f"</{tag}>")
    start = text.rfind(f"<{tag}>", 0, end) if end >= 0 else -1
    return text[start + len(tag) + 2:end] if start >= 0 else None


def last_boxed(text: str) -> str | None:
    r"""The argument of the last \boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def answer_text(completion: str) -> str:
    """What a completion answers: its last <answer> block, else its last fenced code block,
    else all of it."""
    tagged = tag_content(completion, "answer")
    if tagged is not None:
        return tagged.strip()
    fences = re.findall(r"```[A-Za-z0-9_-]*\n(.*?)```", completion, flags=re.DOTALL)  # non-nesting: linear
    return (fences[-1] if fences else completion).strip()


class _FieldParams(Reward.Params):
    field: str = Field(default="answer", pattern=FIELD_PATTERN, description="record field holding the reference")


@register_reward
class ExactReward(Reward):
    """1 if the completion equals the record's answer (surrounding whitespace ignored)."""

    name = "exact"
    Params = _FieldParams

    def score_one(self, sample: Sample) -> float:
        return float(sample.completion.strip() == str(record_field(sample, self.params.field, self.name)).strip())


def normalize(text: str) -> str:
    """NFKC, case-folded, punctuation removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(text.split())


@register_reward
class NormalizedReward(Reward):
    """1 if the completion equals the answer ignoring case, whitespace, punctuation (NFKC)."""

    name = "normalized"
    Params = _FieldParams

    def score_one(self, sample: Sample) -> float:
        return float(normalize(sample.completion) == normalize(record_field(sample, self.params.field, self.name)))


@register_reward
class ContainsReward(Reward):
    """1 if the record's answer occurs in the completion."""

    name = "contains"

    class Params(_FieldParams):
        case_sensitive: bool = True

    def score_one(self, sample: Sample) -> float:
        answer = record_field(sample, self.params.field, self.name).strip()
        if not answer:
            raise DataError(f"reward 'contains': a record's {self.params.field!r} is empty (it would match anything)")
        text = sample.completion
        if not self.params.case_sensitive:
            answer, text = answer.casefold(), text.casefold()
        return float(answer in text)


@register_reward
class MathReward(Reward):
    r"""1 if the final answer equals the record's answer as math (math-verify: 0.5 = \frac{1}{2}).

    The prediction is the completion's last <answer> block, else its last \boxed{}, else the
    whole completion (math-verify then finds the last expression). Only its last `max_chars`
    characters are read, more than 32 nested braces score 0, and each comparison runs in a
    worker process killed after `timeout_s` (score 0): math-verify's own signal timeouts
    are off, since they fail outside the main thread. A gold answer that is not math
    ("Paris") must match the prediction's text exactly, which also scores 1 for any gold.
    """

    name = "math"
    MAX_BRACE_DEPTH = 32

    class Params(_FieldParams):
        max_chars: int = Field(default=4096, ge=16, le=65_536, description="answer characters read (the last ones)")
        timeout_s: float = Field(default=5.0, gt=0.0, le=60.0, description="per comparison; slower answers score 0")

    def __init__(self, params: Params):
        super().__init__(params)
        import importlib.util

        if importlib.util.find_spec("math_verify") is None:
            raise ConfigError("reward 'math' needs the math-verify package (pip install math-verify)")
        from bastion.rewards.mathverify import MathVerifier

        self.verifier = MathVerifier(params.timeout_s)  # the worker starts on first use

    def score_one(self, sample: Sample) -> float:
        gold = str(record_field(sample, self.params.field, self.name, (str, int, float)))[-self.params.max_chars:]
        pred = self.prediction(sample.completion)
        if _unboxed(pred).strip() == gold.strip():  # the same text ("Paris", "x+1"): no need to parse
            return 1.0
        if not pred.strip() or _brace_depth(pred) > self.MAX_BRACE_DEPTH or _brace_depth(gold) > self.MAX_BRACE_DEPTH:
            return 0.0
        return float(self.verifier.equivalent(gold, pred))

    def prediction(self, completion: str) -> str:
        tagged = tag_content(completion, "answer")
        text = tagged if tagged is not None else completion
        boxed = last_boxed(text[-self.params.max_chars:])
        # A lone \boxed{} keeps math-verify from reading every boxed value as one set ({3, 5}).
        return f"\\boxed{{{boxed}}}" if boxed is not None else text[-self.params.max_chars:]

    def close(self) -> None:
        self.verifier.close()


def _unboxed(pred: str) -> str:
    return pred[len("\\boxed{"):-1] if pred.startswith("\\boxed{") else pred


def _brace_depth(text: str) -> int:
    depth = deepest = 0
    for c in text:
        if c in "{([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in "})]":
            depth = max(depth - 1, 0)
    return deepest


@register_reward
class RegexReward(Reward):
    """1 if the pattern matches the completion (whole of it, or anywhere with mode: search).

    Python's `re` backtracks: completions over `max_chars` characters score 0 unmatched.
    """

    name = "regex"

    class Params(Reward.Params):
        pattern: str = Field(min_length=1, max_length=MAX_PATTERN_CHARS, description="a Python regular expression")
        mode: Literal["fullmatch", "search"] = "fullmatch"
        max_chars: int = Field(default=16_384, ge=1, le=MAX_MATCH_CHARS, description="longer completions score 0")

        @field_validator("pattern")
        @classmethod
        def _compiles(cls, pattern: str) -> str:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
            return pattern

    def __init__(self, params: Params):
        super().__init__(params)
        compiled = re.compile(params.pattern)
        self.match = compiled.fullmatch if params.mode == "fullmatch" else compiled.search

    def score_one(self, sample: Sample) -> float:
        if len(sample.completion) > self.params.max_chars:
            return 0.0
        return float(self.match(sample.completion) is not None)


@register_reward
class FormatReward(Reward):
    """1 if the completion is <think>...</think> then <answer>...</answer> and nothing else.

    Whitespace may surround the blocks; neither block may hold its own tags again. Checked
    with string searches (linear), not a backtracking pattern.
    """

    name = "format"

    class Params(Reward.Params):
        think_tag: str = Field(default="think", pattern=TAG_PATTERN)
        answer_tag: str = Field(default="answer", pattern=TAG_PATTERN)

    def score_one(self, sample: Sample) -> float:
        rest = _block(sample.completion.strip(), self.params.think_tag)
        rest = _block(rest.lstrip(), self.params.answer_tag) if rest is not None else None
        return float(rest == "")


def _block(text: str, tag: str) -> str | None:
    """What follows a leading <tag>...</tag> whose content holds no <tag> or </tag>, else None."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    end = text.find(closing)
    if not text.startswith(opening) or end < 0 or opening in text[len(opening):end]:
        return None
    return text[end + len(closing):]


class _JSONParams(Reward.Params):
    max_chars: int = Field(default=65_536, ge=2, le=MAX_MATCH_CHARS, description="longer completions score 0")


def completion_json(sample: Sample, max_chars: int) -> tuple[bool, Any]:
    """(parsed, value) of the completion's answer: its <answer> block, else a fenced block,
    else the whole completion (nesting bounded by safeio.parse_json). Completions over
    `max_chars` characters are not parsed: (False, None)."""
    if len(sample.completion) > max_chars:
        return False, None
    text = answer_text(sample.completion)
    try:
        return True, parse_json(text, DataError, "completion")
    except DataError:
        return False, None


@register_reward
class JSONValidReward(Reward):
    """1 if the answer (<answer> block, a ```json block, or the completion) parses as JSON."""

    name = "json_valid"
    Params = _JSONParams

    def score_one(self, sample: Sample) -> float:
        return float(completion_json(sample, self.params.max_chars)[0])


@register_reward
class LengthReward(Reward):
    """1 if the completion's length (characters or tokens) is within [min, max]."""

    name = "length"

    class Params(Reward.Params):
        min: int | None = Field(default=None, ge=0, le=10**9)
        max: int | None = Field(default=None, ge=0, le=10**9)
        unit: Literal["chars", "tokens"] = "chars"

        @model_validator(mode="after")
        def _a_range(self) -> "LengthReward.Params":
            if self.min is None and self.max is None:
                raise ValueError("give min, max or both")
            if self.min is not None and self.max is not None and self.min > self.max:
                raise ValueError(f"min ({self.min}) is larger than max ({self.max})")
            return self

    def score_one(self, sample: Sample) -> float:
        n = len(sample.completion) if self.params.unit == "chars" else sample.completion_tokens
        lo, hi = self.params.min, self.params.max
        return float((lo is None or n >= lo) and (hi is None or n <= hi))


@register_reward
class OverlongReward(Reward):
    """DAPO's soft overlong punishment (Yu et al. 2025): 0 down to -penalty near the limit.

    With L completion tokens and limit M (the max_new_tokens it was generated under): 0 while
    L <= M - buffer, then linear to -penalty at L = M; -penalty for a completion cut at the
    limit (finish_reason "length"). buffer 0 punishes only cut completions.
    """

    name = "overlong"

    class Params(Reward.Params):
        buffer: int = Field(default=0, ge=0, le=1_000_000, description="tokens before the limit where punishment starts")
        penalty: float = Field(default=1.0, ge=0.0, le=100.0, description="the punishment at the limit")

    def score_one(self, sample: Sample) -> float:
        limit, length = sample.max_new_tokens, sample.completion_tokens
        if limit <= 0:
            raise DataError("reward 'overlong' needs the generation limit (Sample.max_new_tokens)")
        if sample.finish_reason == "length" or length >= limit:
            return -self.params.penalty
        start = limit - min(self.params.buffer, limit)
        return 0.0 if length <= start else -self.params.penalty * (length - start) / (limit - start)


@register_reward
class KeywordsReward(Reward):
    """1 if the completion holds all (or any) of the keywords: a list, or a record field's list."""

    name = "keywords"

    class Params(Reward.Params):
        words: list[str] | None = Field(default=None, min_length=1, max_length=256, description="the keywords")
        field: str = Field(default="keywords", pattern=FIELD_PATTERN, description="record field read when words is not set")
        mode: Literal["all", "any"] = "all"
        case_sensitive: bool = False

        @field_validator("words")
        @classmethod
        def _short_words(cls, words: list[str] | None) -> list[str] | None:
            if words is not None and any(not 1 <= len(w) <= 256 for w in words):
                raise ValueError("each keyword has 1 to 256 characters")
            return words

    def score_one(self, sample: Sample) -> float:
        words = self.params.words if self.params.words is not None else self._record_words(sample)
        text = sample.completion if self.params.case_sensitive else sample.completion.casefold()
        found = [(w if self.params.case_sensitive else w.casefold()) in text for w in words]
        return float(all(found) if self.params.mode == "all" else any(found))

    def _record_words(self, sample: Sample) -> list[str]:
        words = record_field(sample, self.params.field, self.name, (list,))
        if not words or len(words) > 256 or not all(isinstance(w, str) and w for w in words):
            raise DataError(f"reward 'keywords': a record's {self.params.field!r} must be a list of 1 to 256 "
                            "non-empty strings")
        return words


@register_reward
class JSONSchemaReward(Reward):
    """1 if the answer is JSON that a JSON Schema (the record's, or the `schema` param) accepts.

    The validator follows the schema's $schema (default Draft 2020-12); the schema is checked
    against its metaschema first. References resolve only within the schema and to the
    standard metaschemas: nothing is ever fetched, and a $ref to anything else is an error.
    """

    name = "json_schema"

    class Params(_JSONParams):
        schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema",
                                                     description="the schema (else the record's field)")
        field: str = Field(default="schema", pattern=FIELD_PATTERN, description="record field read when schema is not set")

        @field_validator("schema_")
        @classmethod
        def _valid_schema(cls, schema: dict[str, Any] | bool | None) -> dict[str, Any] | bool | None:
            if schema is not None:
                schema_validator(schema, ValueError, "schema")
            return schema

    def __init__(self, params: Params):
        super().__init__(params)
        self.validator = None if params.schema_ is None else schema_validator(params.schema_, ConfigError, "schema")

    def score_one(self, sample: Sample) -> float:
        validator = self.validator or self._record_validator(sample)
        parsed, value = completion_json(sample, self.params.max_chars)
        if not parsed:
            return 0.0
        from referencing.exceptions import Unresolvable

        try:
            return float(validator.is_valid(value))
        except Unresolvable as exc:
            raise DataError(f"reward 'json_schema': schema reference {str(exc)[:200]!r} cannot be resolved "
                            "(only references within the schema and to the standard metaschemas; nothing is fetched)") from None

    def _record_validator(self, sample: Sample) -> Any:
        schema = record_field(sample, self.params.field, self.name, (dict, str))
        where = f"record field {self.params.field!r}"
        if isinstance(schema, str):
            schema = parse_json(schema, DataError, where)
        return schema_validator(schema, DataError, where)


def schema_validator(schema: Any, error: type[Exception], where: str) -> Any:
    """A jsonschema validator for `schema` that never fetches a reference; `error` (naming
    `where`) if the schema is not a valid one."""
    from jsonschema import Draft202012Validator, SchemaError
    from jsonschema.validators import validator_for
    from jsonschema_specifications import REGISTRY  # the metaschemas, local; retrieving anything else fails

    if not isinstance(schema, (dict, bool)):
        raise error(f"{where}: a JSON Schema is an object or a boolean, not {type(schema).__name__}")
    cls = validator_for(schema, default=None)
    if cls is None and isinstance(schema, dict) and "$schema" in schema:
        raise error(f"{where}: unknown $schema {str(schema['$schema'])[:100]!r}")
    cls = cls or Draft202012Validator
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise error(f"{where}: not a valid {cls.__name__.removesuffix('Validator')} schema: {exc.message[:200]}") from None
    return cls(schema, registry=REGISTRY)


__all__ = ["ContainsReward", "ExactReward", "FormatReward", "JSONSchemaReward", "JSONValidReward", "KeywordsReward",
           "LengthReward", "MathReward", "NormalizedReward", "OverlongReward", "RegexReward", "answer_text",
           "completion_json", "last_boxed", "normalize", "record_field", "tag_content"]
