"""Synthetic corpora are deterministic and have the structure their docstrings promise."""
from __future__ import annotations

import json
import re

from synthetic.corpus import (
    arithmetic_documents,
    grammar_documents,
    held_out_arithmetic,
    is_grammatical,
    write_corpus,
)


def test_arithmetic_deterministic_and_correct() -> None:
    a = arithmetic_documents(50, seed=7, max_operand=30)
    assert a == arithmetic_documents(50, seed=7, max_operand=30)
    assert a != arithmetic_documents(50, seed=8, max_operand=30)
    for doc in a:
        lines = doc.split("\n")
        assert len(lines) == 8
        for line in lines:
            x, y, z = map(int, re.fullmatch(r"(\d+)\+(\d+)=(\d+)", line).groups())
            assert x + y == z and x <= 30 and y <= 30


def test_held_out_pairs_never_in_training() -> None:
    held = held_out_arithmetic(1000, seed=0, max_operand=30)
    assert held and held == held_out_arithmetic(1000, seed=0, max_operand=30)
    assert all(str(eval(p[:-1])) == ans for p, ans in held)  # noqa: S307 - digits and '+' only
    train_lines = [line for d in arithmetic_documents(500, seed=1, max_operand=30) for line in d.split("\n")]
    seen = {line.split("=")[0] + "=" for line in train_lines}
    assert not seen & {p for p, _ in held}
    assert len(held_out_arithmetic(5, seed=0)) == 5


def test_grammar_deterministic_and_grammatical() -> None:
    docs = grammar_documents(40, seed=2)
    assert docs == grammar_documents(40, seed=2) and docs != grammar_documents(40, seed=3)
    sentences = [s for d in docs for s in d.split(". ")]
    assert all(is_grammatical(s) for s in sentences)
    assert not is_grammatical("the cats chases the dog.")  # agreement violated
    assert not is_grammatical("the cat chases.")
    assert not is_grammatical("cat the chases the dog")


def test_write_corpus(tmp_path) -> None:
    docs = ["a\nb", "ü 日本"]
    path = write_corpus(tmp_path, docs, "c")
    assert [json.loads(x)["text"] for x in path.read_text(encoding="utf-8").splitlines()] == docs
    assert (path.stat().st_mode & 0o777) == 0o600
    folder = write_corpus(tmp_path, docs, "t", fmt="txt")
    assert [p.read_text(encoding="utf-8") for p in sorted(folder.iterdir())] == docs
