"""The sandbox chat templates render in: Jinja's immutable sandbox, bounded in memory and time.

A chat template is code that ships with a model, so a hostile one must fail fast and small.
Jinja's `ImmutableSandboxedEnvironment` keeps it away from Python internals and from the
data passed in; on top of it every operation that can build a large value has its result
size computed *before* it runs, from the sizes of its operands:

  * `~` (which `_ChatCodeGenerator` routes here, with every for-loop's items), `+`, `*`, `%`,
    `str.format` / `format_map`, `join`, `replace`, `center` / `ljust` / `rjust` / `zfill`,
    `expandtabs`, `translate`, the filters that turn values into text (`|replace`, `|join`,
    `|indent`, `|wordwrap`, `|format`, `|sum`, `|string`, ...), `tojson` (streamed, indent at
    most `MAX_JSON_INDENT`), `lipsum`, every `{{ ... }}` value (`finalize`) and every
    captured block (`{% set %}...{% endset %}`, macros: `concat`);
  * `text_size` gives the length of `str(value)` for containers without building it (a list
    holding one long string 4,000 times is 4,000 times that string's length).

Each result may be at most `max_chars` characters, and one render may build at most
`RENDER_WORK_FACTOR` x `max_chars` in all (values that are built and dropped count too), so
a render never holds more than that whatever the template does; past either bound the
conversation is too long for the template (`ChatTooLongError`, which datasets drop and
count). Time: the render deadline is checked at each of those operations, every call,
attribute access and item lookup, and every step of every for-loop. Other refusals are
`SecurityError`s, which `ChatFormat` turns into one-line `DataError`s.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
import math
import re
import string
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.filters import make_attrgetter
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, _PassArg, generate_lorem_ipsum

from bastion.errors import DataError

DEFAULT_MAX_CHARS = 4_000_000
MAX_TEMPLATE_CHARS = 256 * 1024
RENDER_WORK_FACTOR = 16  # text one render may build, in units of max_chars
MAX_JSON_INDENT = 64  # tojson(indent=...): real templates use 2 or 4
LIPSUM_CHARS_PER_WORD = 12  # an upper bound on lipsum's words, with their separators


# ---- the limits of the render in progress ------------------------------------------------


@dataclass
class _RenderLimits:
    deadline: float = math.inf
    work_left: float = math.inf  # characters the render may still build


_limits: contextvars.ContextVar[_RenderLimits] = contextvars.ContextVar("bastion_chat_limits", default=_RenderLimits())


@contextlib.contextmanager
def render_limits(max_chars: int, seconds: float) -> Iterator[None]:
    """Bound the renders made inside: `seconds` of wall time, and RENDER_WORK_FACTOR x
    `max_chars` characters built."""
    token = _limits.set(_RenderLimits(time.monotonic() + seconds, RENDER_WORK_FACTOR * max_chars))
    try:
        yield
    finally:
        _limits.reset(token)


def check_deadline() -> None:
    if time.monotonic() > _limits.get().deadline:
        raise SecurityError("chat template took too long to render")


class ChatTooLongError(DataError):
    """A conversation renders past `max_chars`, or needs a value or intermediate text past
    its bounds to render (datasets drop and count these)."""


def _charge(size: int, max_chars: int, what: str) -> None:
    """Admit a value of `size` characters about to be built, or refuse it before it is. Too
    long for the limit, whether the template amplifies or the conversation is long."""
    limits = _limits.get()
    if time.monotonic() > limits.deadline:
        raise SecurityError("chat template took too long to render")
    if size > max_chars:
        raise ChatTooLongError(f"chat template {what} would produce at least {size} characters, over the limit of {max_chars}")
    limits.work_left -= size
    if limits.work_left < 0:
        raise ChatTooLongError(f"chat template built more than {RENDER_WORK_FACTOR} times the output limit "
                               f"({max_chars} characters) in intermediate text")


# ---- result sizes, computed before the result exists ---------------------------------------


def _quoted_size(text: str) -> int:
    """len(repr(text)), or at least as much."""
    if text.isprintable():
        return len(text) + 2 + text.count("\\") + text.count("'") + text.count('"')
    return len(text) * (4 if text.isascii() else 10) + 2  # \x00, \U0010ffff: the longest escapes


def text_size(value: Any, cap: int) -> int:
    """len(str(value)) for the values a template holds (strings, numbers, lists, tuples,
    dicts, namespaces), without building the text; shared items count every time they
    appear. Counting stops once past `cap`, so the walk is short for a hostile value."""
    if isinstance(value, str):
        return len(value)
    total, stack = 0, [value]
    while stack and total <= cap:
        item = stack.pop()
        if isinstance(item, str):
            total += _quoted_size(item)
        elif isinstance(item, Namespace):
            total += 14
            stack.append(item._Namespace__attrs)  # type: ignore[attr-defined]  # repr shows them
        elif isinstance(item, Mapping):
            total += 2 + 4 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (bytes, bytearray)):
            total += 4 * len(item) + 3
        elif isinstance(item, Collection) and not isinstance(item, range):  # lists, tuples, sets, dict views
            total += 16 + 2 * len(item)
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            total += item.bit_length() // 3 + 2
        else:  # floats, None, booleans, ranges, macros, loops: short representations
            total += 32
    return total


def _widest(values: Iterable[Any], cap: int, ascii_escaped: bool) -> int:
    """The longest text a format field can make of one of `values`: as repr() (%r, !r) shows
    it, which is never shorter than str(); ten times longer where ascii() (%a, !a) may be."""
    widest = max((text_size((v,), cap) for v in values), default=0)
    return widest * 10 if ascii_escaped else widest


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-+ #0]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?[diouxXeEfFgGcrsa%]")


def _percent_size(fmt: str, values: Any, max_chars: int) -> int:
    """An upper bound of len(fmt % values): each field as long as the longest value plus its
    width and precision (a `*` width: the largest integer given)."""
    items = list(values.values()) if isinstance(values, Mapping) else list(values) if isinstance(values, tuple) else [values]
    specs = list(_PERCENT_SPEC.finditer(fmt))
    widest = _widest(items, max_chars, ascii_escaped=any(m.group().endswith("a") for m in specs))
    star = max((abs(v) for v in items if isinstance(v, int)), default=0)
    size = len(fmt)
    for match in specs:
        for number in match.groups():
            size += star if number == "*" else int(number or 0)
        size += widest
    return size


def _format_size(fmt: str, args: Sequence[Any], kwargs: Mapping[str, Any], max_chars: int) -> int:
    """An upper bound of len(fmt.format(*args, **kwargs)): each field as long as the longest
    argument plus the numbers in its format spec (a nested `{}` spec: the largest integer)."""
    values = [*args, *kwargs.values()]
    widest = _widest(values, max_chars, ascii_escaped="!a" in fmt)
    largest = max((abs(v) for v in values if isinstance(v, int)), default=0)
    size = 0
    for literal, field, spec, _ in string.Formatter().parse(fmt):
        size += len(literal)
        if field is not None:
            spec = spec or ""
            size += widest + sum(int(n) for n in re.findall(r"\d+", spec)) + (largest if "{" in spec else 0)
    return size


def _join_size(items: Sequence[Any], sep: str, max_chars: int) -> int:
    size = len(sep) * max(len(items) - 1, 0)
    for item in items:
        size += text_size(item, max_chars)
        if size > max_chars:
            break
    return size


def _replace_size(text: str, old: str, new: str, count: int | None) -> int:
    hits = len(text) + 1 if old == "" else text.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * (len(new) - len(old))


def _translate_size(text: str, table: Any) -> int:
    longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1) if isinstance(table, Mapping) else 1
    return len(text) * max(longest, 1)


def _width(value: Any) -> int:
    return value if isinstance(value, int) else len(value) if isinstance(value, str) else 0


# str methods that can make their result much longer than the string: result size before the call.
_STR_METHODS: dict[str, Any] = {
    "replace": lambda s, old, new, count=-1: _replace_size(s, old, new, count),
    "center": lambda s, width, *fill: max(len(s), width),
    "ljust": lambda s, width, *fill: max(len(s), width),
    "rjust": lambda s, width, *fill: max(len(s), width),
    "zfill": lambda s, width: max(len(s), width),
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t") * max(tabsize, 0),
    "translate": _translate_size,
}


# ---- the environment -------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's assistant-mask marker): renders its body.
    Bastion computes the assistant mask itself, so the tag has no other effect."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _OptionalUndefined(jinja2.StrictUndefined):
    """Strict, except that a missing value tests false, as in Hugging Face's rendering: real
    templates ask `if message.tool_calls` of messages without tool calls (Qwen2.5). Printing,
    iterating or comparing one is still an error, so a typo does not silently drop text."""

    __slots__ = ()

    def __bool__(self) -> bool:
        return False


class _ChatCodeGenerator(CodeGenerator):
    """Jinja's code generator with `~` and every for-loop routed through the sandbox, which
    Jinja itself never asks (it intercepts only binary operators and calls)."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: Frame) -> None:
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_For(self, node: jinja2.nodes.For, frame: Frame) -> None:
        if not (isinstance(node.iter, jinja2.nodes.Call) and isinstance(node.iter.node, jinja2.nodes.EnvironmentAttribute)):
            node.iter = jinja2.nodes.Call(jinja2.nodes.EnvironmentAttribute("checked_iter"), [node.iter], [], None, None)
        super().visit_For(node, frame)


class _ChatSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})
    code_generator_class = _ChatCodeGenerator

    def __init__(self, max_chars: int):
        super().__init__(
            trim_blocks=True, lstrip_blocks=True, autoescape=False, undefined=_OptionalUndefined,
            extensions=[_GenerationTag, jinja2.ext.loopcontrols], finalize=self._finalize,
        )
        self.max_chars = max_chars
        self.concat = self._checked_buffer  # captured blocks: {% set %}...{% endset %}, macros, {% filter %}

    def charge(self, size: int, what: str) -> None:
        _charge(size, self.max_chars, what)

    def _size_ok(self, value: Any, what: str) -> Any:
        if isinstance(value, (str, list, tuple, dict)) and len(value) > self.max_chars:
            raise SecurityError(f"chat template {what} produced {len(value)} items, over the limit of {self.max_chars}")
        return value

    def _args_ok(self, args: Sequence[Any], kwargs: Mapping[str, Any], what: str) -> None:
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > self.max_chars:
                raise SecurityError(f"chat template {what} got the integer {arg}, over the limit of {self.max_chars}")
            self._size_ok(arg, f"{what} argument")

    # -- operations Jinja routes here ------------------------------------------------------
    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "+" and type(left) is str and type(right) is str:  # most of a real template's work
            limits, size = _limits.get(), len(left) + len(right)
            if size > self.max_chars or limits.work_left < size or time.monotonic() > limits.deadline:
                self.charge(size, "operator +")  # raises, saying which bound
            limits.work_left -= size
            return left + right
        check_deadline()
        if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            self.charge(len(left) + len(right), "operator +")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    self.charge(len(seq) * max(n, 0), "operator *")
        elif operator == "**":
            if isinstance(right, (int, float)) and abs(right) > 64 or isinstance(left, (int, float)) and abs(left) > 2**64:
                raise SecurityError("chat template raises to a power that is too large")
        elif operator == "%" and isinstance(left, str):
            self.charge(_percent_size(left, right, self.max_chars), "operator %")
        return self._size_ok(super().call_binop(context, operator, left, right), f"operator {operator}")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: PYI063 - jinja's signature
        check_deadline()
        __self._args_ok(args, kwargs, "call")
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str) and getattr(__obj, "__name__", None) == "join":
            args = (list(args[0]), *args[1:]) if args else args  # sized before the call, then joined
            __self.charge(_join_size(args[0], owner, __self.max_chars) if args else 0, "str.join")
        elif isinstance(owner, str) and getattr(__obj, "__name__", None) in _STR_METHODS:
            __self.charge(_STR_METHODS[__obj.__name__](owner, *args, **kwargs), f"str.{__obj.__name__}")
        return __self._size_ok(super().call(__context, __obj, *args, **kwargs), "call")

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            fields = (args[0] if args and isinstance(args[0], Mapping) else {}) if is_map else kwargs
            self.charge(_format_size(fmt, () if is_map else args, fields, self.max_chars), "str.format")
            return wrapped(*args, **kwargs)

        return checked

    def getattr(self, obj: Any, attribute: str) -> Any:
        check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        check_deadline()
        return super().getitem(obj, argument)

    # -- operations `_ChatCodeGenerator` and the environment route here ------------------------
    def checked_concat(self, parts: tuple[Any, ...]) -> str:
        """`a ~ b ~ ...`"""
        self.charge(sum(text_size(p, self.max_chars) for p in parts), "operator ~")
        return "".join(map(str, parts))

    def checked_iter(self, iterable: Any) -> Iterator[Any]:
        """A for-loop's items, the deadline checked at each."""
        for item in iterable:
            check_deadline()
            yield item

    def _checked_buffer(self, parts: Iterable[str]) -> str:
        parts = list(parts)
        self.charge(sum(map(len, parts)), "block")
        return "".join(parts)

    def _finalize(self, value: Any) -> Any:
        """Every `{{ ... }}` value, before it is turned into text."""
        self.charge(text_size(value, self.max_chars), "output")
        return value


# ---- filters and globals -----------------------------------------------------------------


# Filters whose result size follows from named arguments; sized before they run.
_SIZED_FILTERS = frozenset({"center", "format", "indent", "join", "replace", "sum", "wordwrap"})
# Filters that turn their value into text (no longer than a constant times it); the text is sized first.
_TEXT_FILTERS = frozenset({"capitalize", "e", "escape", "forceescape", "lower", "pprint", "safe", "string",
                           "striptags", "title", "trim", "truncate", "upper", "urlencode", "urlize", "wordcount",
                           "xmlattr"})


def _sized_call(env: _ChatSandbox, name: str, a: dict[str, Any], value_name: str) -> int:
    """The result size of filter `name` called with the bound arguments `a` (a value to join or
    sum is made a list in `a`, so that sizing it does not consume it)."""
    if name in ("join", "sum"):
        a[value_name] = items = list(a[value_name])
        if a.get("attribute") is not None:
            items = list(map(make_attrgetter(env, a["attribute"]), items))
        if name == "join":
            return _join_size(items, str(a["d"]), env.max_chars)
        return sum(len(x) for x in (a["start"], *items) if isinstance(x, (str, list, tuple)))
    env.charge(text_size(a[value_name], env.max_chars), f"filter {name} input")
    text = str(a[value_name])
    if name == "replace":
        return _replace_size(text, str(a["old"]), str(a["new"]), a["count"])
    if name == "center":
        return max(len(text), _width(a["width"]))
    if name == "indent":
        return len(text) + (text.count("\n") + 1) * _width(a["width"])
    if name == "wordwrap":
        return len(text) + (len(text) // max(a["width"], 1) + text.count("\n") + 1) * len(a["wrapstring"] or "\n")
    return _percent_size(text, a["kwargs"] or a["args"], env.max_chars)  # format


def _checked_filter(env: _ChatSandbox, name: str, fn: Any) -> Any:
    signature = inspect.signature(fn) if name in _SIZED_FILTERS else None
    skip = 1 if _PassArg.from_obj(fn) is not None else 0  # the context / environment Jinja passes first

    @functools.wraps(fn)  # keeps jinja's pass_context/pass_environment markers
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        check_deadline()
        env._args_ok(args, kwargs, f"filter {name}")
        if signature is not None:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            env.charge(_sized_call(env, name, bound.arguments, list(bound.arguments)[skip]), f"filter {name}")
            args, kwargs = bound.args, bound.kwargs
        elif name in _TEXT_FILTERS and len(args) > skip:
            env.charge(text_size(args[skip], env.max_chars), f"filter {name} input")
        return env._size_ok(fn(*args, **kwargs), f"filter {name}")

    return wrapper


class _TemplateNamespace(Namespace):
    """`namespace()` that refuses underscore names and oversized values (as HF's does for
    names: namespaces are the one mutable object a template gets)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Namespace's signature trick: `self` may be a key
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name, value in attrs.items():
            _TemplateNamespace._check(name, value)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name, value)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot store underscore-prefixed names on a namespace ({name!r})")
        if isinstance(value, (str, list, tuple, dict)) and len(value) > DEFAULT_MAX_CHARS:
            raise SecurityError("chat template namespace value is too large")
        check_deadline()


class _TemplateDict:
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: Any) -> None:
    raise TemplateError(str(message))


def _tojson(env: _ChatSandbox, x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """HF's tojson, streamed: Python's JSON encoder yields the text piece by piece (the pure
    Python one, used for iterencode), and each piece is charged before the next is made."""
    if _width(indent) > MAX_JSON_INDENT:
        raise SecurityError(f"chat template tojson indent {str(indent)[:20]!r} is over the limit of {MAX_JSON_INDENT}")
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    pieces, size = [], 0
    for piece in encoder.iterencode(x):
        size += len(piece)
        env.charge(len(piece), "filter tojson")
        if size > env.max_chars:
            raise ChatTooLongError(f"chat template filter tojson would produce over {env.max_chars} characters")
        pieces.append(piece)
    return "".join(pieces)


def _lipsum(env: _ChatSandbox, n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002 - jinja's names
    env.charge(_non_negative(n) * _non_negative(max) * LIPSUM_CHARS_PER_WORD, "lipsum")
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _non_negative(value: Any) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def _timed_range(*args: int) -> Any:
    from jinja2.sandbox import safe_range  # capped at MAX_RANGE items

    for item in safe_range(*args):
        check_deadline()
        yield item


def compile_template(source: str, max_chars: int, now: datetime) -> jinja2.Template:
    """A chat template compiled in the sandbox; DataError if it does not compile."""
    if not isinstance(source, str):
        raise DataError(f"chat template must be text, got {type(source).__name__}")
    if len(source) > MAX_TEMPLATE_CHARS:
        raise DataError(f"chat template is {len(source)} characters, over the limit of {MAX_TEMPLATE_CHARS}")
    env = _ChatSandbox(max_chars)
    env.filters["tojson"] = functools.partial(_tojson, env)
    env.filters = {name: _checked_filter(env, name, fn) for name, fn in env.filters.items()}
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=lambda fmt: now.strftime(str(fmt)[:100]),
        namespace=_TemplateNamespace,
        dict=_TemplateDict(),
        range=_timed_range,
        lipsum=functools.partial(_lipsum, env),
    )
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise DataError(f"chat template does not compile: {exc}") from None
    except (RecursionError, MemoryError):
        raise DataError("chat template is too deeply nested to compile") from None
