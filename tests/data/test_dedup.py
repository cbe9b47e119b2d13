"""NearDuplicateIndex: catches edited copies, keeps distinct documents, is deterministic everywhere."""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.config.schema import DedupConfig
from bastion.data.dedup import NearDuplicateIndex

REPO = Path(__file__).resolve().parents[2]

# A small topical vocabulary: independent documents share words but (almost) no 5-word runs.
COOKING = [
    "the", "a", "of", "and", "to", "in", "with", "for", "on", "add", "stir", "heat", "pan", "oil",
    "salt", "pepper", "garlic", "onion", "tomato", "sauce", "simmer", "boil", "water", "pasta",
    "minutes", "until", "golden", "brown", "chop", "slice", "dice", "fresh", "basil", "olive",
    "butter", "cream", "cheese", "bake", "oven", "degrees", "tray", "season", "taste", "serve",
    "warm", "hot", "cold", "bowl", "mix", "flour", "sugar", "egg",
]


def make_doc(seed: int, words: int = 300) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(words):
        w = rng.choice(COOKING)
        out.append(w.capitalize() if i % 12 == 0 else w + ("." if i % 12 == 11 else ""))
    return " ".join(out)


def edit(text: str, changes: int, seed: int) -> str:
    """Replace `changes` words at random positions with words outside the vocabulary."""
    rng = random.Random(seed)
    words = text.split()
    for k, pos in enumerate(rng.sample(range(len(words)), changes)):
        words[pos] = f"zz{seed}x{k}"
    return " ".join(words)


def doc_id(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()[:16]


def run(index: NearDuplicateIndex, texts: list[str]) -> list[bytes | None]:
    return [index.check_and_add(doc_id(t), t) for t in texts]


def exact_jaccard(index: NearDuplicateIndex, a: str, b: str) -> float:
    sa, sb = set(index.shingle_hashes(a).tolist()), set(index.shingle_hashes(b).tolist())
    return len(sa & sb) / len(sa | sb)


def mixed_corpus() -> list[str]:
    """Originals, edited copies at several edit levels, and case/whitespace variants."""
    texts = []
    for i in range(12):
        base = make_doc(i)
        texts.append(base)
        texts.append(edit(base, changes=2 * i, seed=100 + i))  # 0..22 changed words of 300
        if i % 3 == 0:
            texts.append("  " + base.upper().replace(" ", "\n\t ") + " ")
    return texts


def test_small_edits_are_caught_and_point_at_the_kept_original():
    idx = NearDuplicateIndex(0.8, 128, 5)
    base = make_doc(1)
    assert idx.check_and_add(b"orig", base) is None
    for k, changes in enumerate((1, 3, 5)):
        variant = edit(base, changes, seed=k)
        assert exact_jaccard(idx, base, variant) > 0.85
        assert idx.check_and_add(b"v%d" % k, variant) == b"orig"
    # An insertion and a deletion of a few words are caught too.
    words = base.split()
    assert idx.check_and_add(b"ins", " ".join(words[:100] + ["extra", "words", "here"] + words[100:])) == b"orig"
    assert idx.check_and_add(b"del", " ".join(words[:150] + words[153:])) == b"orig"
    assert (idx.kept, idx.removed, idx.clusters_removed) == (1, 5, 1)


def test_unrelated_documents_on_the_same_topic_are_kept():
    idx = NearDuplicateIndex(0.8, 128, 5)
    texts = [make_doc(seed) for seed in range(200)]
    assert exact_jaccard(idx, texts[0], texts[1]) < 0.05
    assert run(idx, texts) == [None] * 200
    assert (idx.kept, idx.removed, idx.clusters_removed) == (200, 0, 0)


def test_minhash_estimate_tracks_exact_jaccard():
    idx = NearDuplicateIndex(0.8, 256, 5)
    base = make_doc(7)
    for changes in (0, 5, 15, 30, 60):
        other = edit(base, changes, seed=changes)
        sigs = []
        for text in (base, other):
            idx._mh.clear()
            idx._mh.update_batch(idx.shingle_hashes(text).tolist())
            sigs.append(idx._mh.copy())
        assert abs(sigs[0].jaccard(sigs[1]) - exact_jaccard(idx, base, other)) < 0.1


def test_higher_threshold_removes_fewer():
    texts = mixed_corpus()
    removed = [NearDuplicateIndex(t, 128, 5) for t in (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    for idx in removed:
        run(idx, texts)
    counts = [idx.removed for idx in removed]
    assert counts == sorted(counts, reverse=True), counts
    # 1.0 still removes the 4 case/whitespace variants and the unedited copy; 0.5 also catches
    # most edited copies (exact Jaccard 0.95 down to 0.50).
    assert counts[0] >= 13 and counts[0] > counts[3] > counts[-1] == 5, counts


def test_normalisation_ignores_case_and_whitespace():
    idx = NearDuplicateIndex(1.0, 128, 5)
    base = make_doc(3)
    assert idx.check_and_add(b"a", base) is None
    assert idx.check_and_add(b"b", "\n" + base.lower().replace(" ", "  \t")) == b"a"
    assert idx.check_and_add(b"c", edit(base, 1, seed=0)) is None  # any real change fails 1.0


def test_cluster_counting():
    idx = NearDuplicateIndex(0.8, 128, 5)
    a, b, c = make_doc(10), make_doc(11), make_doc(12)
    decisions = run(idx, [a, edit(a, 2, 1), b, edit(a, 3, 2), edit(b, 1, 3), c, edit(a, 1, 4)])
    assert decisions == [None, doc_id(a), None, doc_id(a), doc_id(b), None, doc_id(a)]
    assert (idx.kept, idx.removed, idx.clusters_removed) == (3, 4, 2)


def test_tiny_and_empty_documents():
    idx = NearDuplicateIndex(0.8, 128, 5)
    for i, text in enumerate(["", "   \n\t", "a", "hi", "é", "日本", "x y", "\x00"]):
        idx.check_and_add(b"t%d" % i, text)
    assert idx.check_and_add(b"e2", "") is None  # empty text is never a duplicate, never indexed
    assert idx.check_and_add(b"h1", "Hello   World") is None  # < 5 words: character 5-grams
    assert idx.check_and_add(b"h2", "hello world") == b"h1"
    assert idx.check_and_add(b"h3", "hello world, again and again") is None
    assert idx.check_and_add(b"hi2", "HI") == b"t3"
    assert idx.check_and_add(b"q1", "what is the capital of france") is None  # exactly one shingle
    assert idx.check_and_add(b"q2", "What is the capital of France?") is None  # one shingle differs
    assert idx.check_and_add(b"q3", "what  is the CAPITAL of france") == b"q1"


def test_scripts_without_spaces_use_character_shingles():
    rng = random.Random(0)
    han = [chr(c) for c in range(0x4E00, 0x4E00 + 300)]
    lines = ["".join(rng.choices(han, k=40)) + "。" for _ in range(15)]  # 15 "words" of 41 chars
    base = "\n".join(lines)
    edited = base.replace(lines[3][5:8], "是不是").replace(lines[9][20:22], "我们")
    idx = NearDuplicateIndex(0.8, 128, 5)
    assert exact_jaccard(idx, base, edited) > 0.9  # word 5-grams would share none of 11 shingles
    assert idx.check_and_add(b"zh", base) is None
    assert idx.check_and_add(b"zh2", edited) == b"zh"
    assert idx.check_and_add(b"zh3", "\n".join(lines[::-1][:8])) is None


def test_lone_surrogates_do_not_crash():
    idx = NearDuplicateIndex(0.8, 128, 5)
    words = ["bad", chr(0xDCFF), "bytes", "from", "a", "surrogateescape", "decode", "here"]
    assert idx.check_and_add(b"s1", " ".join(words)) is None
    assert idx.check_and_add(b"s2", " ".join(words).upper()) == b"s1"
    assert idx.check_and_add(b"s3", "\udcff\udcfe") is None


def test_determinism_across_fresh_indexes():
    texts = mixed_corpus()
    first, second = run(NearDuplicateIndex(0.7, 64, 3, seed=5), texts), run(NearDuplicateIndex(0.7, 64, 3, seed=5), texts)
    assert first == second
    assert any(first) and not all(first)


SCRIPT = """
import json, sys
from bastion.data.dedup import NearDuplicateIndex
items = json.load(open(sys.argv[1]))
idx = NearDuplicateIndex(0.8, 128, 5, seed=9)
out = [idx.check_and_add(bytes.fromhex(i), t) for i, t in items]
print(json.dumps([o.hex() if o else None for o in out]))
"""


def test_determinism_across_processes(tmp_path):
    texts = mixed_corpus()
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps([[doc_id(t).hex(), t] for t in texts]))
    idx = NearDuplicateIndex(0.8, 128, 5, seed=9)
    expected = [o.hex() if o else None for o in run(idx, texts)]
    assert any(expected)
    for hashseed in ("0", "12345"):  # a different str-hash salt must not change anything
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "PYTHONPATH": str(REPO)}
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(corpus)], env=env, capture_output=True, text=True, check=True)
        assert json.loads(proc.stdout) == expected


def test_from_config_and_validation():
    idx = NearDuplicateIndex.from_config(DedupConfig(threshold=0.9, num_perm=64, shingle_words=3))
    assert (idx.threshold, idx.num_perm, idx.shingle_words) == (0.9, 64, 3)
    assert NearDuplicateIndex.from_config(DedupConfig(threshold=1.0, num_perm=17)).check_and_add(b"x", "x") is None
    with pytest.raises(ValueError):
        NearDuplicateIndex(threshold=0.0)
    with pytest.raises(ValueError):
        NearDuplicateIndex(shingle_words=0)
