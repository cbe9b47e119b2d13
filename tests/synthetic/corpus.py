"""Tiny deterministic corpora with structure a small model can provably learn.

Used by tests and examples to check that training really learns something (loss drops well
below the unigram entropy, completions become correct) without downloading any data.
Same (n, seed, ...) -> byte-identical output, on every platform (only `random.Random`).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

# ---- arithmetic ---------------------------------------------------------------------------


def _is_held_out(a: int, b: int, fraction: float) -> bool:
    """A fixed, seed-independent subset of operand pairs never appears in training documents."""
    h = int.from_bytes(hashlib.sha256(f"{a}+{b}".encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def arithmetic_documents(
    n: int, seed: int, max_operand: int = 20, lines_per_doc: int = 8, held_out_fraction: float = 0.1
) -> list[str]:
    """`n` documents of `lines_per_doc` lines "a+b=c" (0 <= a, b <= max_operand), joined by "\\n".

    Structure: the digits after "=" are fully determined by the line's prefix, so a model
    that learns addition can predict them exactly; everything before "=" is uniform noise.
    Pairs selected by `held_out_fraction` are excluded (see `held_out_arithmetic`).
    """
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        while len(lines) < lines_per_doc:
            a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
            if not _is_held_out(a, b, held_out_fraction):
                lines.append(f"{a}+{b}={a + b}")
        docs.append("\n".join(lines))
    return docs


def held_out_arithmetic(
    n: int, seed: int, max_operand: int = 20, held_out_fraction: float = 0.1
) -> list[tuple[str, str]]:
    """Up to `n` distinct (prompt, answer) pairs such as ("12+7=", "19") whose operand pair never
    occurs in `arithmetic_documents` with the same `max_operand` / `held_out_fraction`.

    A correct completion of `prompt` starts with `answer` followed by "\\n" or end of text.
    With `held_out_fraction=0` nothing is held out and any pair may be returned.
    """
    pairs = [
        (a, b)
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
        if held_out_fraction == 0 or _is_held_out(a, b, held_out_fraction)
    ]
    chosen = random.Random(seed).sample(pairs, min(n, len(pairs)))
    return [(f"{a}+{b}=", str(a + b)) for a, b in chosen]


# ---- template grammar -----------------------------------------------------------------------

NOUNS = {"cat": "cats", "dog": "dogs", "bird": "birds", "fox": "foxes", "child": "children"}
VERBS = {"sees": "see", "chases": "chase", "likes": "like", "follows": "follow"}
ADJECTIVES = ("small", "big", "red", "quiet", "happy")


def _noun_phrase(rng: random.Random) -> tuple[str, bool]:
    singular = rng.choice(list(NOUNS))
    plural = rng.random() < 0.5
    noun = NOUNS[singular] if plural else singular
    adj = f"{rng.choice(ADJECTIVES)} " if rng.random() < 0.5 else ""
    return f"the {adj}{noun}", plural


def grammar_documents(n: int, seed: int, sentences_per_doc: int = 4) -> list[str]:
    """`n` documents of sentences "the [adj] NOUN VERB the [adj] NOUN." joined by spaces.

    Structure: every sentence has this fixed shape, and the verb agrees in number with the
    subject ("the cat chases", "the cats chase"), a long-range dependency when an adjective
    sits between them. `is_grammatical` checks generated text against these rules.
    """
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        sentences = []
        for _ in range(sentences_per_doc):
            subject, plural = _noun_phrase(rng)
            verb = rng.choice(list(VERBS))
            obj, _ = _noun_phrase(rng)
            sentences.append(f"{subject} {VERBS[verb] if plural else verb} {obj}.")
        docs.append(" ".join(sentences))
    return docs


def is_grammatical(sentence: str) -> bool:
    """True if `sentence` (one sentence, with or without its final ".") follows the grammar."""
    words = sentence.strip().removesuffix(".").split()
    singular_nouns, plural_nouns = set(NOUNS), set(NOUNS.values())

    def phrase(i: int) -> tuple[int, bool] | None:  # -> (next index, plural) or None
        if i >= len(words) or words[i] != "the":
            return None
        i += 1
        if i < len(words) and words[i] in ADJECTIVES:
            i += 1
        if i < len(words) and words[i] in singular_nouns | plural_nouns:
            return i + 1, words[i] in plural_nouns
        return None

    subj = phrase(0)
    if subj is None or subj[0] >= len(words):
        return False
    i, plural = subj
    verb = words[i]
    if verb not in (set(VERBS.values()) if plural else set(VERBS)):
        return False
    obj = phrase(i + 1)
    return obj is not None and obj[0] == len(words)


# ---- files --------------------------------------------------------------------------------


def write_corpus(directory: str | os.PathLike[str], docs: list[str], name: str = "corpus", fmt: str = "jsonl") -> Path:
    """Write `docs` under `directory` for `bastion data prepare`; returns the path to list in sources.

    fmt "jsonl": one file `<name>.jsonl`, one {"text": doc} per line.
    fmt "txt": a folder `<name>/` with one `<name>_NNNNN.txt` per document.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path = root / f"{name}.jsonl"
        _write_private(path, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
        return path
    if fmt == "txt":
        folder = root / name
        folder.mkdir(mode=0o700, exist_ok=True)
        for i, doc in enumerate(docs):
            _write_private(folder / f"{name}_{i:05d}.txt", doc)
        return folder
    raise ValueError(f"fmt must be 'jsonl' or 'txt', got {fmt!r}")


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        f.write(text)
