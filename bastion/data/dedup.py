"""Near-duplicate removal with MinHash + LSH (datasketch), run after exact dedup.

Each document becomes a set of shingles (word n-grams of its normalised text), summarised by a
MinHash signature of `num_perm` values. LSH banding proposes candidates among the documents kept
so far; a candidate only counts if the signatures agree on >= `threshold` of their values (the
estimated Jaccard similarity, exactly what `MinHash.jaccard` computes), which removes the LSH's
false positives. The first document of a near-duplicate group is kept, later ones are dropped.

Speed: shingles are never built as strings. Each word is hashed once (zlib.crc32 of its UTF-8
bytes, in C; for character shingles the code points are used as they are) and the n-gram hashes
are rolled from those in numpy, then mixed with the
MurmurHash3 64-bit finalizer; the 32-bit results feed `MinHash.update_batch`, which applies all
permutations in one numpy pass. This is ~3x faster than datasketch's default per-shingle SHA-1
(`sha1_hash32`) on ~2 KB documents; the shingle hash only needs to be deterministic and well
spread, not cryptographic.

Determinism: decisions depend only on the sequence of (doc_id, text), never on the process:
crc32 and numpy's wrapping uint64 arithmetic are fixed functions (never Python's salted `hash()`),
the permutations come from `np.random.RandomState(seed)` inside datasketch, the min over shingles
is order-independent, and among several confirmed candidates we pick the most similar, ties going
to the earliest kept. (Same Python + datasketch versions assumed: `str.lower` follows
the interpreter's Unicode tables and datasketch 2.0 changed its default permutation scheme, which
we therefore pin.)
"""
from __future__ import annotations

import zlib

import numpy as np
from datasketch import MinHash, MinHashLSH

from bastion.config.schema import DedupConfig

_SCHEME = "affine32"  # datasketch >= 2.0: uint32 signatures, collision-free permutations
_CHAR_GRAM = 5  # character n-gram size for documents shorter than one word shingle
_ROLL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio) for the n-gram roll
_CHAR_TAG = np.uint64(1 << 40)  # above any code point or crc32 value
_MAX_MEAN_WORD = 16  # longer mean "word" length means a script without spaces: use characters
# LSH (false positive, false negative) weights for picking bands x rows. Candidates are
# confirmed against the signatures anyway, so a false positive costs one vector compare while
# a false negative is a missed duplicate: favour recall. At threshold 0.8 / 128 perms this gives
# 14 bands x 9 rows: a pair at exactly the threshold becomes a candidate 87% of the time, at
# +0.05 97% (datasketch's default 0.5/0.5 gives 9 x 13: 40% and 69%).
_LSH_WEIGHTS = (0.1, 0.9)


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer (a bijection that avalanches every input bit)."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


class NearDuplicateIndex:
    """Streaming near-duplicate filter; call `check_and_add` once per document, in order.

    Memory per KEPT document (dropped ones leave no trace), measured with tracemalloc at
    num_perm=128 on 20k kept documents: the signature row, num_perm * 4 bytes in one uint32 matrix
    that grows by doubling (512 B, ~840 B with the growth slack), plus the doc id (~60 B), plus
    datasketch's LSH dict storage, which costs ~330 B per band (band key bytes, a bucket set,
    dict entries, and its key -> band-keys table): threshold 0.8 = 14 bands ~ 5.5 KB/doc in all
    (~5.5 GB per million kept documents), 0.9 = 8 bands ~ 3.8 KB, 0.5 = 32 bands ~ 10.7 KB.
    So memory is linear in kept documents, with a slope set by the band count (lower thresholds
    use more bands) plus 4 bytes per permutation.
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle_words: int = 5, seed: int = 1):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if num_perm < 4 or shingle_words < 1:
            raise ValueError("num_perm must be >= 4 and shingle_words >= 1")
        self.threshold = threshold
        self.num_perm = num_perm
        self.shingle_words = shingle_words
        # One reusable MinHash: building one per document would redo the permutation RNG each time.
        # hashfunc=int: our shingle hashes are already 32-bit ints (see shingle_hashes).
        self._mh = MinHash(num_perm=num_perm, seed=seed, scheme=_SCHEME, hashfunc=int)
        if threshold >= 1.0:
            # The optimiser picks a single band for 1.0, which MinHashLSH rejects; identical
            # signatures collide in every band, so two halves find them all.
            self._lsh = MinHashLSH(num_perm=num_perm, params=(2, num_perm // 2))
        else:
            self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=_LSH_WEIGHTS)
        # LSH keys are row numbers into these (ints are smaller than the ids and index directly).
        self._sigs = np.empty((64, num_perm), dtype=np.uint32)
        self._ids: list[bytes] = []
        self._clusters: set[int] = set()  # rows of kept docs that had a near-duplicate removed
        self.removed = 0  # documents dropped as near-duplicates

    @classmethod
    def from_config(cls, cfg: DedupConfig, seed: int = 1) -> NearDuplicateIndex:
        return cls(cfg.threshold, cfg.num_perm, cfg.shingle_words, seed=seed)

    @property
    def kept(self) -> int:
        """Documents indexed (kept) so far; documents without shingles are not counted."""
        return len(self._ids)

    @property
    def clusters_removed(self) -> int:
        """Distinct kept documents that had at least one near-duplicate removed."""
        return len(self._clusters)

    def shingle_hashes(self, text: str) -> np.ndarray:
        """32-bit hashes of the document's shingles (uint32; may repeat, the MinHash is a min).

        Shingles are word `shingle_words`-grams of the lower-cased, whitespace-collapsed text
        (`str.split()` splits on any Unicode whitespace). Character 5-grams of the collapsed text
        (the whole text if shorter) are used instead when the text has fewer words than one
        shingle, so short documents still compare sensibly, and when its "words" average more
        than 16 characters, i.e. scripts written without spaces (Chinese, Japanese, Thai), where
        a word shingle would span whole sentences and any edit would change all of them.
        Empty text gives no shingles.
        """
        words = text.lower().split()
        if len(words) >= self.shingle_words and sum(map(len, words)) <= _MAX_MEAN_WORD * len(words):
            # One C-level pass: the joined words split back on b" " (never inside a UTF-8 sequence);
            # surrogatepass so text with lone surrogates hashes instead of raising.
            raw = " ".join(words).encode("utf-8", "surrogatepass").split(b" ")
            items = np.fromiter(map(zlib.crc32, raw), dtype=np.uint64, count=len(raw))
            n = self.shingle_words
        else:
            flat = " ".join(words).encode("utf-32-le", "surrogatepass")
            # Code points, tagged so that character shingles never collide with word shingles.
            items = np.frombuffer(flat, dtype=np.uint32).astype(np.uint64) | _CHAR_TAG
            n = min(_CHAR_GRAM, len(items))
        if n == 0:
            return np.empty(0, dtype=np.uint32)
        m = len(items) - n + 1
        acc = items[:m].copy()
        for k in range(1, n):  # polynomial roll over each window: order matters, as in the text
            acc = acc * _ROLL + items[k : k + m]
        return (_fmix64(acc) >> np.uint64(32)).astype(np.uint32)

    def signature(self, text: str) -> np.ndarray | None:
        """The document's MinHash signature (`num_perm` uint32 values), or None for text without
        shingles. Depends on the text alone, so worker processes compute it (bastion.data.parallel)."""
        hashes = self.shingle_hashes(text)
        if not len(hashes):
            return None
        mh = self._mh
        mh.clear()
        mh.update_batch(hashes.tolist())  # one numpy pass over shingles x permutations
        return mh.hashvalues.copy()

    def check_and_add(self, doc_id: bytes, text: str) -> bytes | None:
        """Return the id of a kept document that `text` near-duplicates (and do not add it), or
        None and add it. Text without shingles (empty/whitespace) is never a duplicate and is not
        indexed: there is nothing to compare."""
        return self.check_and_add_signature(doc_id, self.signature(text))

    def check_and_add_signature(self, doc_id: bytes, sig: np.ndarray | None) -> bytes | None:
        """`check_and_add` from a precomputed `signature(text)`; call in document order."""
        if sig is None:
            return None
        if sig.shape != (self.num_perm,) or sig.dtype != np.uint32:
            raise ValueError(f"signature must be {self.num_perm} uint32 values, got {sig.shape} {sig.dtype}")
        mh = self._mh
        mh.hashvalues = sig  # the LSH reads only the hash values

        candidates = self._lsh.query(mh)
        if candidates:
            rows = np.sort(np.fromiter(candidates, dtype=np.int64, count=len(candidates)))
            agree = np.count_nonzero(self._sigs[rows] == sig, axis=1)
            best = int(np.argmax(agree))  # first maximum = earliest kept among equally similar
            # Same expression as MinHash.jaccard, so the float comparison is identical to it.
            if float(agree[best]) / float(self.num_perm) >= self.threshold:
                row = int(rows[best])
                self.removed += 1
                self._clusters.add(row)
                return self._ids[row]

        row = len(self._ids)
        if row == len(self._sigs):  # amortised doubling; O(kept) memory overall
            self._sigs = np.concatenate([self._sigs, np.empty_like(self._sigs)])
        self._sigs[row] = sig
        self._ids.append(doc_id)
        self._lsh.insert(row, mh, check_duplication=False)
        return None
