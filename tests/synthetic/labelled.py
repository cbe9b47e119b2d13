"""Labelled texts a tiny model can provably learn (classify / regress tests and bench/classify.py).

Each text is a few filler syllable-words with one marker word somewhere among them; the marker
decides the label. Classify: the marker names the class. Regress: the marker carries a value
in [-3, 3] (the CMU-MOSI range), plus a little seeded noise so the labels are not only the
seven integers. Same (n, seed) -> identical records on every platform (only `random.Random`).
"""
from __future__ import annotations

import random
from pathlib import Path

from synthetic.chat import SYLLABLES

CLASS_MARKERS = {"neg": "awful", "neu": "plain", "pos": "lovely"}
VALUE_MARKERS = {"dreadful": -3.0, "bad": -1.5, "meh": 0.0, "nice": 1.5, "superb": 3.0}


def _filler(rng: random.Random) -> list[str]:
    return ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(rng.randint(2, 10))]


def _with_marker(rng: random.Random, marker: str) -> str:
    words = _filler(rng)
    words.insert(rng.randint(0, len(words)), marker)
    return " ".join(words)


def classify_records(n: int, seed: int = 0) -> list[dict]:
    """{"text", "label"} with the label one of CLASS_MARKERS' names, classes balanced."""
    rng = random.Random(seed)
    names = list(CLASS_MARKERS)
    return [{"text": _with_marker(rng, CLASS_MARKERS[names[i % 3]]), "label": names[i % 3]} for i in range(n)]


def regress_records(n: int, seed: int = 0, noise: float = 0.2) -> list[dict]:
    """{"text", "label"} with the label the marker's value + uniform noise, clipped to [-3, 3]."""
    rng = random.Random(seed)
    markers = list(VALUE_MARKERS)
    out = []
    for i in range(n):
        marker = markers[i % len(markers)]
        value = max(-3.0, min(3.0, VALUE_MARKERS[marker] + rng.uniform(-noise, noise)))
        out.append({"text": _with_marker(rng, marker), "label": round(value, 3)})
    return out


def write_labelled_splits(root: Path) -> None:
    """The classify and regress train / validation files the task tests train on:
    c.jsonl / cv.jsonl (classify), r.jsonl / rv.jsonl (regress), in `root`."""
    from synthetic.chat import write_jsonl

    write_jsonl(root / "c.jsonl", classify_records(300, seed=1))
    write_jsonl(root / "cv.jsonl", classify_records(60, seed=2))
    write_jsonl(root / "r.jsonl", regress_records(300, seed=1))
    write_jsonl(root / "rv.jsonl", regress_records(60, seed=2))
