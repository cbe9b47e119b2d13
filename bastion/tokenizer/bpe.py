"""Byte-level BPE tokenizer: a thin, validated wrapper around HF `tokenizers`.

Byte-level means every Unicode string is representable (no unknown token), and the NFC
normaliser makes `decode(encode(s)) == unicodedata.normalize("NFC", s)` for any `s`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from bastion.errors import DataError
from bastion.safeio import read_json_limited

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
DEFAULT_MAX_TOKENIZER_BYTES = 64 * 2**20  # a 1M-token vocab with merges is ~50 MiB
MAX_ID_GAPS = 1024  # ids a vocabulary may skip (tokenizers in use skip none, or a removed pad token)


class BastionTokenizer:
    """Byte-level BPE with `<|endoftext|>` (eos) and `<|pad|>` special tokens; a tokenizer
    imported from Hugging Face names its own (`eos_token`, `pad_token`: a model without a pad
    token pads with eos, which is safe because padding never carries loss or attention)."""

    def __init__(self, tokenizer: Tokenizer, *, eos_token: str | None = None, pad_token: str | None = None,
                 bos_token: str | None = None):
        eos_token = eos_token or EOS_TOKEN
        pad_token = pad_token or (PAD_TOKEN if tokenizer.token_to_id(PAD_TOKEN) is not None else eos_token)
        missing = [t for t in dict.fromkeys((eos_token, pad_token)) if tokenizer.token_to_id(t) is None]
        if missing:
            raise DataError(f"tokenizer lacks required special token(s): {', '.join(missing)}")
        # Security: text that merely *contains* "<|endoftext|>" must not become the eos id
        # (a document could otherwise forge document boundaries or stop generation early).
        # Specials are only ever inserted by id, by the caller.
        tokenizer.encode_special_tokens = True
        self._tok = tokenizer
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
        self.eos_id: int = tokenizer.token_to_id(eos_token)
        self.pad_id: int = tokenizer.token_to_id(pad_token)
        self.bos_id: int | None = tokenizer.token_to_id(bos_token) if bos_token else None
        ids = tokenizer.get_vocab(with_added_tokens=True).values()
        self.max_id: int = max(ids, default=-1)
        # The ids text can map to, so the rows a model's embedding needs: the vocabulary's
        # size, or more when its ids have gaps (an imported tokenizer without its pad token).
        # Bounded, so that an id a file merely claims never sizes an embedding.
        self.vocab_size: int = max(len(ids), self.max_id + 1)
        if self.vocab_size > len(ids) + MAX_ID_GAPS:
            raise DataError(f"tokenizer has token id {self.max_id}, far past its {len(ids)} tokens "
                            f"(at most {MAX_ID_GAPS} unused ids are accepted)")
        # Does the tokenizer's own post-processor begin every text with bos (Llama, Mistral)?
        # Then the model saw bos first in training, and plain-text prompts start with it too.
        starts = tokenizer.encode("a", add_special_tokens=True).ids[:1] if self.bos_id is not None else []
        self.adds_bos: bool = starts == [self.bos_id]

    # ---- construction -------------------------------------------------------------
    @staticmethod
    def _empty() -> Tokenizer:
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> "BastionTokenizer":
        """Train from any iterable of strings; it is consumed once, as a stream."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (bytes + specials)")
        tok = cls._empty()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),  # ids 0 and 1
            # All 256 bytes up front, so any text is encodable even if unseen in training.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_json_str(cls, s: str, **special_tokens: str | None) -> "BastionTokenizer":
        """`special_tokens`: eos_token / pad_token / bos_token strings (None = Bastion's)."""
        try:
            tok = Tokenizer.from_str(s)
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON/schema
            raise DataError(f"invalid tokenizer JSON: {exc}") from None
        return cls(tok, **special_tokens)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_TOKENIZER_BYTES
    ) -> "BastionTokenizer":
        """Load a `tokenizer.json`, refusing missing, oversized, or malformed files."""
        p = Path(path)
        # Parsed once here for a clear JSON error (line/column) before tokenizers' terser one.
        text = json.dumps(read_json_limited(p, max_bytes, DataError, "tokenizer file"))
        try:
            return cls.from_json_str(text)
        except DataError as exc:
            raise DataError(f"tokenizer file {p}: {exc}") from None

    # ---- use ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A plain-text prompt's ids: `encode(text)`, after bos when the tokenizer adds one
        to every text (as transformers' `tokenizer(text)` does for Llama and Mistral)."""
        ids = self.encode(text)
        return [self.bos_id, *ids] if self.adds_bos else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Ids back to text. Out-of-range ids raise (tokenizers would silently drop them)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} outside vocabulary [0, {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def to_json_str(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write `tokenizer.json` with mode 0600 (atomic: temp file + rename)."""
        p = Path(path)
        tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
        # O_NOFOLLOW: never write through a symlink planted at the temp path.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.to_json_str().encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # O_CREAT's mode is masked by umask; make it exact
        os.replace(tmp, p)

    @property
    def backend(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (for callers needing offsets etc.)."""
        return self._tok

    def __repr__(self) -> str:
        return f"BastionTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"
