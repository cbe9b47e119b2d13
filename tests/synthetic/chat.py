"""Tiny deterministic fine-tuning tasks a small model can provably learn (tests, examples).

  * SFT, "reverse": the user says "reverse: a b c" and the assistant answers "<r>c b a</r>" -
    a format no base model knows, with a fixed, seed-independent set of words held out
    (`held_out_reverse_prompts`) to check generalisation rather than recall. Letters are
    space-separated so each is one token whatever BPE merges: the task is then reordering
    tokens, which a small transformer learns in a few hundred steps.
  * Preference, "greet": the user says "greet alice"; the chosen reply is the polite,
    formatted "Hello, Alice! Nice to meet you." and the rejected one is one of a few rude or
    badly formatted variants. The preference is learnable from the first tokens.

Same (n, seed, ...) -> identical records on every platform (only `random.Random`).
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bastion.safeio import open_private

LETTERS = "abcdefghij"
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "da", "po", "li")


def _held_out(key: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    return h / 2**64 < fraction


# ---- SFT: reverse ---------------------------------------------------------------------------


def reverse_reply(word: str) -> str:
    """"abc" -> "<r>c b a</r>"."""
    return f"<r>{' '.join(word[::-1])}</r>"


def _reverse_messages(word: str, system: bool) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": "You reverse words."}] if system else []
    return msgs + [{"role": "user", "content": f"reverse: {' '.join(word)}"}]


def reverse_chat_records(
    n: int, seed: int, min_len: int = 3, max_len: int = 6, held_out_fraction: float = 0.1, system_fraction: float = 0.3
) -> list[dict[str, Any]]:
    """`n` chat records {"messages": [...]} teaching "reverse: a b c" -> "<r>c b a</r>"."""
    rng = random.Random(seed)
    records = []
    while len(records) < n:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
        if _held_out(word, held_out_fraction):
            continue
        msgs = _reverse_messages(word, rng.random() < system_fraction)
        msgs.append({"role": "assistant", "content": reverse_reply(word)})
        records.append({"messages": msgs})
    return records


def held_out_reverse_prompts(
    n: int, seed: int, min_len: int = 3, max_len: int = 6, held_out_fraction: float = 0.1
) -> list[tuple[list[dict[str, str]], str]]:
    """Up to `n` distinct (prompt messages, expected reply) for words never in training."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    for _ in range(200 * n):
        if len(seen) >= n:
            break
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
        if _held_out(word, held_out_fraction):
            seen.setdefault(word)
    return [(_reverse_messages(w, False), reverse_reply(w)) for w in seen]


# ---- preference: greet ----------------------------------------------------------------------

RUDE = ("{name}.", "go away {name}", "whatever, {name}", "HELLO {upper}!!!", "hi {name} i guess")


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))


def polite_greeting(name: str) -> str:
    return f"Hello, {name.capitalize()}! Nice to meet you."


def greeting_preference_records(
    n: int, seed: int, chat: bool = True, held_out_fraction: float = 0.1
) -> list[dict[str, Any]]:
    """`n` preference records; chat form ({"prompt": [msgs], "chosen": [msg], ...}) or
    string form ({"prompt": str, "chosen": str, "rejected": str})."""
    rng = random.Random(seed)
    records = []
    while len(records) < n:
        name = _name(rng)
        if _held_out(name, held_out_fraction):
            continue
        prompt = f"greet {name}"
        chosen = polite_greeting(name)
        rejected = rng.choice(RUDE).format(name=name, upper=name.upper())
        if chat:
            records.append({
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            })
        else:
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return records


def held_out_greeting_prompts(n: int, seed: int, held_out_fraction: float = 0.1) -> list[tuple[list[dict[str, str]], str]]:
    """Up to `n` distinct (prompt messages, polite reply) for names never in training."""
    rng = random.Random(seed)
    seen: dict[str, None] = {}
    for _ in range(200 * n):
        if len(seen) >= n:
            break
        name = _name(rng)
        if _held_out(name, held_out_fraction):
            seen.setdefault(name)
    return [([{"role": "user", "content": f"greet {nm}"}], polite_greeting(nm)) for nm in seen]


def write_jsonl(path: str | Path, records: Iterable[Any]) -> Path:
    """Write records one JSON object per line (mode 0600, no symlink following)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open_private(p) as fh:
        for record in records:
            fh.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    return p


def greeting_kto_records(n: int, seed: int, chat: bool = True, held_out_fraction: float = 0.1) -> list[dict[str, Any]]:
    """`n` KTO records ({"prompt", "completion", "label"}): the greeting pairs unpaired, the
    polite reply labelled true right before the rude one labelled false (same prompt on
    neighbouring lines, as files converted from preference pairs are)."""
    records = []
    for pair in greeting_preference_records((n + 1) // 2, seed, chat=chat, held_out_fraction=held_out_fraction):
        records.append({"prompt": pair["prompt"], "completion": pair["chosen"], "label": True})
        records.append({"prompt": pair["prompt"], "completion": pair["rejected"], "label": False})
    return records[:n]
