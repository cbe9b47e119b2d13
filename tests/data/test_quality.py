"""QualityFilter: good text of many kinds is kept, crafted bad text is dropped with the right reason."""
from __future__ import annotations

import random

import pytest

from bastion.config.schema import QualityConfig
from bastion.data.quality import (
    REASONS,
    QualityFilter,
    is_text_char,
    non_text_count,
    repeated_line_stats,
)

PROSE = """The committee met on Tuesday to review the budget. After a long discussion, members agreed
that the library's opening hours should be extended during the exam period (8 a.m. - 10 p.m.),
at an estimated cost of $12,400 - roughly 3% of this year's allowance. "It's money well spent,"
said the chair; nobody objected. The decision takes effect on 1 March."""

CODE = '''import os
from pathlib import Path


def read_config(path: str | os.PathLike) -> dict[str, str]:
    """Parse KEY=VALUE lines; '#' starts a comment."""
    result: dict[str, str] = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, _, value = line.partition("=")
        result[key.strip()] = value.strip()
    return result


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def bump(self, by: int = 1) -> int:
        self.n += by
        return self.n


if __name__ == "__main__":
    print(read_config("app.env"), Counter().bump(), {"a": [1, 2], "b": (3,)}, 0x1F & ~2 ^ 4)
'''

CJK = """人工智能是计算机科学的一个分支，它企图了解智能的实质，并生产出一种新的能以人类智能相似的方式做出反应的智能机器。
機械学習は、データから学習するアルゴリズムの研究です。「東京」で開かれた会議には、約三百人が参加した。
한국어 문장도 포함합니다: 오늘 날씨가 좋습니다."""

ARABIC = """اللُّغَةُ العَرَبِيَّةُ مِنْ أَكْثَرِ اللُّغَاتِ انْتِشَارًا فِي العَالَمِ، يَتَحَدَّثُهَا أَكْثَرُ مِنْ ٤٠٠ مِلْيُونِ نَسَمَةٍ.
وتُكتب من اليمين إلى اليسار، ولها ثمانية وعشرون حرفًا. می‌خواهم فارسی هم بنویسم."""

MARKDOWN = """# Results

| model | params | loss  | tokens/s |
|-------|-------:|:-----:|---------:|
| tiny  | 1.2M   | 3.41  | 120,000  |
| small | 25M    | 2.87  | 48,500   |
| base  | 110M   | 2.31  | 11,200   |

*Note:* loss is measured on the held-out split -> lower is better; ~±0.02 run to run. Temps in °C ✓ 🎉
"""

GOOD = {"prose": PROSE, "code": CODE, "cjk": CJK, "arabic": ARABIC, "markdown": MARKDOWN}


def filt(**kw) -> QualityFilter:
    return QualityFilter(QualityConfig(**kw))


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_text_is_kept_by_default(name):
    text = GOOD[name]
    assert filt().reason(text) is None
    assert non_text_count(text) <= 1  # ZWNJ in the Persian line, emoji etc. all count as text


def test_reason_names_and_order():
    assert REASONS == ("too_short", "too_long", "non_text", "repeated_lines")
    f = filt(min_chars=5, max_chars=20, max_non_text_fraction=0.1, max_repeated_line_fraction=0.1)
    assert f.reason("abc") == "too_short"
    assert f.reason("\x00" * 30) == "too_long"  # also non-text, but length is checked first
    assert f.reason("\x00\x00abc") == "non_text"
    assert f.reason("x\nx\nx\nx") == "repeated_lines"
    assert f.reason("hello world") is None


def test_length_boundaries_are_inclusive():
    f = filt(min_chars=10, max_chars=12)
    assert f.reason("a" * 9) == "too_short"
    assert f.reason("a" * 10) is None
    assert f.reason("a" * 12) is None
    assert f.reason("a" * 13) == "too_long"
    assert f.reason("日" * 10) is None  # code points, not bytes
    assert filt(min_chars=0).reason("") is None  # empty text: no division by zero


@pytest.mark.parametrize("bad", ["\x00", "\x1b", "\x7f", "\x85", "\ue000", "\ufffd", "\u2588", "\u2500", "\u28ff", "\u200b", "\ufeff", chr(0xDCFF)])
def test_non_text_boundary(bad):
    # Exactly at max_non_text_fraction is kept, one more character over is dropped; both the ASCII
    # fast path ("abcdefg") and the general path ("日本語...") agree.
    f = filt(max_non_text_fraction=0.3)
    for good in ("abcdefg", "日本語のテキスト"[:7]):
        assert not is_text_char(bad)
        assert f.reason(good + bad * 3) is None  # 3 / 10
        assert f.reason(good[:6] + bad * 4) == "non_text"  # 4 / 10


def test_whitespace_and_joiners_are_text():
    for ch in "\t\n\r\v\f \u00a0\u3000\u2028\u200c\u200d":
        assert is_text_char(ch), repr(ch)
    assert filt(max_non_text_fraction=0.0).reason("a\tb\r\nc\fd\ve") is None


def test_non_text_spam_is_dropped():
    box = "┌────────┐\n│████████│\n└────────┘\n" * 20
    assert filt().reason(box) == "non_text"
    assert filt().reason("caf\ufffd na\ufffdve \ufffd\ufffd\ufffd\ufffd\ufffd") == "non_text"
    assert filt().reason("".join(map(chr, range(0xE000, 0xE100)))) == "non_text"
    assert filt().reason("ok" + "\x00\x01\x02" * 20) == "non_text"


def test_fast_path_matches_per_character_definition():
    rng = random.Random(0)
    alphabet = [chr(c) for c in (*range(0x80), 0x85, 0xA0, 0xE9, 0x4E2D, 0x2500, 0xE000, 0xFFFD, 0x200B, 0x1F600)]
    for _ in range(200):
        text = "".join(rng.choices(alphabet, k=rng.randrange(0, 40)))
        assert non_text_count(text) == sum(not is_text_char(c) for c in text)
        ascii_text = "".join(c for c in text if c.isascii())
        assert non_text_count(ascii_text) == sum(not is_text_char(c) for c in ascii_text)


def test_repeated_lines_boundary_and_stripping():
    f = filt(max_repeated_line_fraction=0.5)
    assert repeated_line_stats("a\n  a \n\n\t\nb\n") == (3, 1)  # stripped, blank lines ignored
    assert f.reason("a\na\na\nb") is None  # 2 of 4 repeat = 0.5: kept
    assert f.reason("a\na\na\na") == "repeated_lines"  # 3 of 4
    assert f.reason(" a\na \n\ta\n\n\nb\n\n") is None  # same 2 of 4 after stripping
    assert f.reason("x\n" + "same line\n" * 5) == "repeated_lines"  # 4 of 6


def test_short_documents_are_exempt_from_repeats():
    f = filt(max_repeated_line_fraction=0.0)
    assert f.reason("spam\nspam") is None  # only 2 non-empty lines
    assert f.reason("spam\n\n\nspam\n") is None
    assert f.reason("spam\nspam\nspam") == "repeated_lines"
    assert f.reason("one\ntwo\nthree") is None  # no repeats at all is fine even at 0.0


def test_boilerplate_is_dropped_but_real_code_is_not():
    nav = "Home | About | Contact\nSubscribe to our newsletter\n" * 10 + "Actual article text."
    assert filt().reason(nav) == "repeated_lines"
    assert repeated_line_stats(CODE)[1] / repeated_line_stats(CODE)[0] < 0.2
