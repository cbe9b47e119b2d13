"""Cheap per-document quality filters: length, non-text characters, repeated lines.

`QualityFilter.reason(text)` returns None to keep a document, or the name of the first filter
it fails (one of `REASONS`, checked in that order, cheapest first) so the pipeline can count
drops per reason. Every filter is a single linear pass in C-level string/bytes operations plus
O(distinct characters) Python work; there are no regular expressions.
"""
from __future__ import annotations

import unicodedata
from collections import Counter
from functools import lru_cache

from bastion.config.schema import QualityConfig

REASONS = ("too_short", "too_long", "non_text", "repeated_lines")

# What counts as "text" (everything else is "non-text"), by Unicode general category:
#   text:     L* letters, M* combining marks (Arabic harakat, Indic vowel signs), N* numbers,
#             P* punctuation, Sm/Sc/Sk math, currency and modifier symbols, Z* separators,
#             So "other symbols" (°, ©, ™, arrows, emoji) EXCEPT the art/spam ranges below,
#             the whitespace controls \t \n \v \f \r, and ZWNJ/ZWJ (U+200C/U+200D), which
#             Persian, Indic scripts and emoji sequences need.
#   non-text: other Cc controls (NUL, ESC, DEL, C1 controls...), Cf format characters (zero-width
#             space, BOM, bidi overrides), Co private use, Cs lone surrogates, Cn unassigned,
#             U+FFFD REPLACEMENT CHARACTER (the trace of a bad decode), and the So ranges
#             box drawing + block elements (U+2500-U+259F) and Braille patterns (U+2800-U+28FF),
#             which in bulk are ASCII/Unicode art or terminal dumps rather than prose or code.
_TEXT_CATEGORIES = frozenset({
    "Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No",
    "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp",
})
_TEXT_CONTROLS = frozenset("\t\n\v\f\r\u200c\u200d")
_SPAM_RANGES = ((0x2500, 0x259F), (0x2800, 0x28FF), (0xFFFD, 0xFFFD))
# ASCII fast path: the only non-text ASCII characters are controls other than \t\n\v\f\r, and DEL.
_ASCII_NON_TEXT = bytes([*range(0x09), *range(0x0E, 0x20), 0x7F])


@lru_cache(maxsize=1 << 16)  # bounded; a corpus uses far fewer distinct characters than this
def is_text_char(ch: str) -> bool:
    """True if `ch` counts as text for the non_text filter (see the table above)."""
    if ch in _TEXT_CONTROLS:
        return True
    cp = ord(ch)
    if any(lo <= cp <= hi for lo, hi in _SPAM_RANGES):
        return False
    return unicodedata.category(ch) in _TEXT_CATEGORIES


def non_text_count(text: str) -> int:
    """Number of characters in `text` that are not text (see the table above)."""
    if text.isascii():
        raw = text.encode("ascii")
        return len(raw) - len(raw.translate(None, _ASCII_NON_TEXT))
    # Counter counts in C; we then classify each DISTINCT character once, so the Python-level
    # work is O(alphabet), not O(len(text)) - CJK documents have a few thousand at most.
    return sum(n for ch, n in Counter(text).items() if not is_text_char(ch))


def repeated_line_stats(text: str) -> tuple[int, int]:
    """(non-empty lines, non-empty lines equal to an earlier one), comparing stripped lines."""
    seen: set[str] = set()
    lines = repeats = 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        lines += 1
        if line in seen:
            repeats += 1
        else:
            seen.add(line)
    return lines, repeats


class QualityFilter:
    """Applies the `QualityConfig` thresholds; see `reason`."""

    # Documents with fewer non-empty lines than this skip the repeated_lines check: with two
    # lines a single repeat is already 50%, which says nothing about boilerplate.
    MIN_LINES_FOR_REPEATS = 3

    def __init__(self, cfg: QualityConfig):
        self.cfg = cfg

    def reason(self, text: str) -> str | None:
        """None to keep `text`, else the name of the first failing filter (see `REASONS`).

        Lengths are in Unicode code points. Fractions are compared with `>`: a document exactly
        at `max_non_text_fraction` / `max_repeated_line_fraction` is kept.
        """
        cfg = self.cfg
        n = len(text)
        if n < cfg.min_chars:
            return "too_short"
        if n > cfg.max_chars:
            return "too_long"
        if n and non_text_count(text) / n > cfg.max_non_text_fraction:
            return "non_text"
        lines, repeats = repeated_line_stats(text)
        if lines >= self.MIN_LINES_FOR_REPEATS and repeats / lines > cfg.max_repeated_line_fraction:
            return "repeated_lines"
        return None
