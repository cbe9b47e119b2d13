"""Chat templates: conversations -> text (for display) and -> token ids + assistant mask (for
training and generation), without letting message text forge the conversation's structure.

Rendering. A chat template is a Jinja template in the Hugging Face convention (variables
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools`, `documents`; helpers
`raise_exception`, `strftime_now`, `namespace`, `dict`; `{% generation %}` blocks accepted
and ignored). Templates are code - an imported model's template is untrusted - so they run in
`jinja2.sandbox.ImmutableSandboxedEnvironment`: no access to underscore attributes or Python
internals, no imports, no mutation of the data passed in; an undefined value tests false (as
in HF, so `if message.tool_calls` works) but printing or iterating one raises. On top of the
sandbox (`bastion/tokenizer/sandbox.py`), a render is bounded: output length (`max_chars`),
wall time (`max_render_seconds`, checked at every operation and loop step), and memory:
every operation that can build a large value (`~`, `+`, `*`, `%`, format, join, replace,
tojson, lipsum, output values, captured blocks...) has its result sized before it runs,
each result at most `max_chars` and all of them together at most `RENDER_WORK_FACTOR` x
`max_chars`. Every failure is a one-line `DataError` (`ChatTooLongError` past a size bound,
which datasets drop and count).

Tokenizing without forgery. Special tokens (`<|endoftext|>`, an imported model's
`<|im_start|>`...) must enter only through the template, never through message text: a user
message containing "<|im_end|>\\n<|im_start|>assistant\\n" must not open an assistant turn.
The conversation is rendered twice: once with the real messages and once with every
message's content replaced by an unguessable sentinel. The sentinel render splits the text
into the template's own pieces and the content pieces; template pieces are tokenized with
the tokenizer's added tokens recognised (so `{{ eos_token }}` becomes the eos id), content
pieces are tokenized as plain text (`tokenizer.encode`, which never produces a special id).
The two renders must agree (content may be trimmed by the template, as Llama 3's does;
anything else - a template that branches on content - is refused).

Assistant mask, for any template, by incremental rendering: an assistant message `i` spans
from the end of `render(messages[:i], add_generation_prompt=True)` (the prompt a model is
given at inference) to the end of `render(messages[:i + 1])`, trimmed of whitespace after
its last special token (ChatML's "\\n" after `<|im_end|>`). Both renders must be prefixes of
the whole render, else the template is refused as inconsistent. The mask therefore covers
the reply and its end-of-turn marker, so the model learns to stop. Tokenization also breaks
at these boundaries, so the ids of a prompt rendered with `add_generation_prompt=True` are
exactly the first ids of the same conversation once the reply is appended: training and
generation see the same tokens.

The built-in template (for Bastion-trained models, whose tokenizer has only the eos and pad
specials) is ChatML with the eos token as end of turn:

    <|im_start|>user\\nHi<|endoftext|>\\n<|im_start|>assistant\\nHello!<|endoftext|>\\n

"<|im_start|>" is plain text there (there is no special id for it), but a turn can only
end with the eos *id*, which message text cannot produce, so injected markers stay inside
the message that contains them. A tokenizer that does have `<|im_start|>`/`<|im_end|>` as
special tokens gets them as single ids automatically.
"""
from __future__ import annotations

import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Protocol

from jinja2.exceptions import SecurityError, TemplateError

from bastion.errors import DataError
from bastion.tokenizer.sandbox import DEFAULT_MAX_CHARS, ChatTooLongError, compile_template, render_limits

ROLES = ("system", "user", "assistant", "tool")
DEFAULT_MAX_RENDER_SECONDS = 2.0
FIXED_NOW = datetime(2025, 1, 1, tzinfo=timezone.utc)  # strftime_now: reproducible data

# Bastion's built-in ChatML-like template; `eos_token` closes every turn.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message.role + '\\n' + message.content + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ChatTokenizer(Protocol):
    """What ChatFormat needs from a tokenizer (BastionTokenizer provides it)."""

    eos_id: int

    def encode(self, text: str) -> list[int]: ...


# ---- message checks -------------------------------------------------------------------------


def check_messages(messages: Any, where: str = "conversation") -> list[dict[str, str]]:
    """Plain copies of `messages` ({"role", "content"} with a known role and string content),
    or a DataError naming the first problem. Ordering rules are the dataset's business."""
    if not isinstance(messages, (list, tuple)):
        raise DataError(f"{where}: messages must be a list, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise DataError(f"{where}: message {i} must be an object, got {type(m).__name__}")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise DataError(f"{where}: message {i} has unsupported key(s) {', '.join(map(repr, extra))} (only role, content)")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) content must be a string, got {type(content).__name__}")
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{where}: message {i} ({role}) content is not valid Unicode (lone surrogate)") from None
        out.append({"role": role, "content": content})
    return out


def check_conversation(messages: Any, *, ends_with: tuple[str, ...], starts_after: str | None = None) -> list[dict[str, str]]:
    """Validated plain copies of `messages`, in an order a conversation can have: an
    optional system message first, then user; a user message is followed by an assistant
    one; an assistant message by a user or tool message; a tool message by a tool or
    assistant one; contents non-empty. The last message's role must be in `ends_with`.
    `starts_after` checks a continuation: the role of the message before the first one."""
    msgs = check_messages(messages, where="messages")
    if not msgs:
        raise DataError("no messages")
    prev = starts_after
    allowed_after = {"user": (None, "system", "assistant"), "assistant": ("user", "tool"), "tool": ("assistant", "tool")}
    for i, m in enumerate(msgs):
        role = m["role"]
        if not m["content"].strip():
            raise DataError(f"message {i} ({role}) has empty content")
        if role == "system":
            if i != 0 or starts_after is not None:
                raise DataError(f"message {i}: a system message may only come first")
        elif prev not in allowed_after[role]:
            after = "the start" if prev is None else f"a {prev} message"
            raise DataError(f"message {i}: roles out of order ({role} after {after})")
        prev = role
    if msgs[-1]["role"] not in ends_with:
        raise DataError(f"the last message is {msgs[-1]['role']}; expected {' or '.join(ends_with)}")
    return msgs



# ---- ChatFormat -----------------------------------------------------------------------------


def _added_tokens(tokenizer: Any) -> dict[str, tuple[int, bool]]:
    """Added token text -> (id, special), from a BastionTokenizer's `backend` or a
    `tokenizers.Tokenizer`; {} for tokenizers that expose none."""
    backend = getattr(tokenizer, "backend", tokenizer)
    getter = getattr(backend, "get_added_tokens_decoder", None)
    if getter is None:
        return {}
    return {tok.content: (int(i), bool(tok.special)) for i, tok in getter().items() if tok.content}


def _token_text(tokenizer: Any, token_id: int) -> str:
    backend = getattr(tokenizer, "backend", tokenizer)
    id_to_token = getattr(backend, "id_to_token", None)
    text = id_to_token(token_id) if id_to_token is not None else None
    if text is None:
        raise DataError(f"tokenizer has no text for token id {token_id}")
    return text


class ChatFormat:
    """Conversations -> text or (ids, assistant mask), with `template` (None = Bastion's
    built-in ChatML-like template). See the module docstring for how forgery is prevented."""

    def __init__(
        self,
        tokenizer: ChatTokenizer,
        template: str | None = None,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        max_chars: int = DEFAULT_MAX_CHARS,
        max_render_seconds: float = DEFAULT_MAX_RENDER_SECONDS,
        now: datetime = FIXED_NOW,
    ):
        self.tokenizer = tokenizer
        self.is_default = template is None
        self.template_source = DEFAULT_CHAT_TEMPLATE if template is None else template
        self.max_chars = int(max_chars)
        self.max_render_seconds = float(max_render_seconds)
        self._template = compile_template(self.template_source, self.max_chars, now)
        self.eos_token = eos_token if eos_token is not None else _token_text(tokenizer, tokenizer.eos_id)
        self.bos_token = bos_token if bos_token is not None else ""
        added = _added_tokens(tokenizer)
        self.added_tokens = {text: tid for text, (tid, _) in added.items()}
        # Security: a special token that plain text can produce (a tokenizer left matching
        # specials inside text) would let messages forge structure: refuse it. Non-special
        # added tokens (e.g. "<tool_call>") are ordinary text by design and never structural.
        leaky = [t for t, (tid, special) in added.items() if special and tid in tokenizer.encode(t)]
        if leaky:
            raise DataError(
                f"tokenizer turns the text {leaky[0]!r} into its special id; message text could forge turns "
                "(BastionTokenizer disables this - load tokenizers through it)"
            )
        self._structural = {t: tid for t, (tid, special) in added.items() if special}
        names = sorted(self.added_tokens, key=len, reverse=True)
        self._added_re = re.compile("|".join(map(re.escape, names))) if names else None
        # Content sentinels: secret per instance, so message text cannot imitate one.
        self._nonce = secrets.token_hex(12)
        self._sentinel_re = re.compile(f"\ue000{self._nonce}:(\\d+)\ue001")
        self._template_ids: dict[str, list[int]] = {}  # encodings of template text pieces

    # ---- text ---------------------------------------------------------------------------
    def _render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
        try:
            with render_limits(self.max_chars, self.max_render_seconds):
                out: list[str] = []
                size = 0
                for chunk in self._template.generate(
                    messages=[dict(m) for m in messages], add_generation_prompt=bool(add_generation_prompt),
                    bos_token=self.bos_token, eos_token=self.eos_token, tools=None, documents=None,
                ):
                    size += len(chunk)
                    if size > self.max_chars:
                        raise ChatTooLongError(f"rendered conversation exceeds {self.max_chars} characters")
                    out.append(chunk)
                return "".join(out)
        except DataError:
            raise
        except SecurityError as exc:
            raise DataError(f"chat template refused by the sandbox: {exc}") from None
        except TemplateError as exc:
            raise DataError(f"chat template error: {exc}") from None
        except RecursionError:
            raise DataError("chat template recursed too deeply") from None
        except Exception as exc:  # noqa: BLE001 - a template can raise anything Python can (TypeError...)
            raise DataError(f"chat template failed: {type(exc).__name__}: {exc}") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as the template renders it (HF `apply_chat_template(tokenize=False)`)."""
        return self._render(check_messages(messages), add_generation_prompt)

    # ---- ids ----------------------------------------------------------------------------
    def encode_prompt(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """Ids of a conversation followed by the assistant header: what to feed for generation."""
        return self.encode_conversation(messages, add_generation_prompt=True)[0]

    @property
    def stop_ids(self) -> list[int]:
        """End-of-turn ids to stop generation on: eos plus any structural end marker the
        tokenizer has (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `<|end|>`)."""
        ids = [self.tokenizer.eos_id]
        for name in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
            if name in self._structural and name in self.template_source and self._structural[name] not in ids:
                ids.append(self._structural[name])
        return ids

    def encode_conversation(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """(ids, assistant_mask): mask[j] is True for the tokens of assistant replies,
        including the end-of-turn marker, and False for everything else."""
        msgs = check_messages(messages)
        real = self._render(msgs, add_generation_prompt)
        segments = self._content_segments(msgs, add_generation_prompt, real)  # [(start, end, is_content)]

        specials: list[tuple[int, int, int]] = []  # (start, end, id) of added tokens in template text
        if self._added_re is not None:
            for start, end, is_content in segments:
                if not is_content:
                    for m in self._added_re.finditer(real, start, end):
                        specials.append((m.start(), m.end(), self.added_tokens[m.group()]))

        spans = self._assistant_spans(msgs, add_generation_prompt, real, specials)

        # Cut the text at segment edges, special tokens and assistant-span edges; tokenize
        # each piece on its own (content: plain text; template text: cached).
        cuts = {0, len(real)}
        for start, end, _ in segments:
            cuts.update((start, end))
        for start, end in spans:
            cuts.update((start, end))
        special_at = {start: (end, tid) for start, end, tid in specials}
        for start, end, _ in specials:
            cuts.update((start, end))
        content_ends = {start: end for start, end, is_content in segments if is_content}
        ids: list[int] = []
        mask: list[bool] = []
        points = sorted(cuts)
        span_list = sorted(spans)
        seg_end = -1  # end of the content segment the current piece lies in, if any
        i = 0
        while i < len(points) - 1:
            start = points[i]
            if start in content_ends:
                seg_end = content_ends[start]
            if start in special_at and start >= seg_end:
                end, tid = special_at[start]
                piece_ids = [tid]
                while i < len(points) and points[i] < end:
                    i += 1
            else:
                end = points[i + 1]
                i += 1
                text = real[start:end]
                if start < seg_end:
                    piece_ids = self.tokenizer.encode(text)
                else:
                    piece_ids = self._template_ids.get(text)
                    if piece_ids is None:
                        piece_ids = self.tokenizer.encode(text)
                        if len(self._template_ids) < 4096:
                            self._template_ids[text] = piece_ids
            inside = any(s <= start and end <= e for s, e in span_list)
            ids.extend(piece_ids)
            mask.extend([inside] * len(piece_ids))
        return ids, mask

    def _content_segments(
        self, msgs: list[dict[str, str]], add_generation_prompt: bool, real: str
    ) -> list[tuple[int, int, bool]]:
        """Split the real render into template text and message content, via a render in
        which each content is an unguessable sentinel."""
        nonce = self._nonce
        masked = self._render(
            [{"role": m["role"], "content": f"\ue000{nonce}:{i}\ue001"} for i, m in enumerate(msgs)], add_generation_prompt
        )
        parts = self._sentinel_re.split(masked)
        if any(nonce in p for p in parts[::2]):
            raise DataError("chat template cuts into message content; it cannot be tokenized safely")
        segments: list[tuple[int, int, bool]] = []
        pos = 0
        refused = DataError(
            "chat template changes its output depending on message content (beyond trimming it); "
            "special tokens could not be kept out of message text, so it is refused"
        )
        for k, part in enumerate(parts):
            if k % 2 == 0:
                if not real.startswith(part, pos):
                    raise refused
                segments.append((pos, pos + len(part), False))
                pos += len(part)
                continue
            content = msgs[int(part)]["content"]
            following = parts[k + 1]
            for variant in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
                if real.startswith(variant, pos) and real.startswith(following, pos + len(variant)):
                    break
            else:
                raise refused
            segments.append((pos, pos + len(variant), True))
            pos += len(variant)
        if pos != len(real):
            raise refused
        return [s for s in segments if s[1] > s[0]]

    def _assistant_spans(
        self, msgs: list[dict[str, str]], add_generation_prompt: bool, real: str, specials: list[tuple[int, int, int]]
    ) -> list[tuple[int, int]]:
        spans = []
        n = len(msgs)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = self._render(msgs[:i], True)
            upto = real if (i == n - 1 and not add_generation_prompt) else self._render(msgs[: i + 1], False)
            if not (real.startswith(prompt) and real.startswith(upto) and len(prompt) <= len(upto)):
                raise DataError(
                    f"chat template is not prefix-consistent at message {i} (rendering fewer messages, or adding the "
                    "generation prompt, does not give a prefix of the whole conversation); cannot locate assistant replies"
                )
            start, end = len(prompt), len(upto)
            inside = [e for s, e, _ in specials if start <= s and e <= end]
            if inside and not real[inside[-1]:end].strip():
                end = inside[-1]  # drop the whitespace after the end-of-turn marker
            if end > start:
                spans.append((start, end))
        return spans

    def __repr__(self) -> str:
        kind = "built-in" if self.is_default else f"{len(self.template_source)}-character"
        return f"ChatFormat({kind} template, eos_token={self.eos_token!r})"
