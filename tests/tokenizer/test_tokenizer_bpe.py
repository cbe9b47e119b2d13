"""Byte-level BPE: lossless round trip (modulo NFC), specials, save/load, hostile files."""
from __future__ import annotations

import json
import os
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.errors import DataError
from bastion.tokenizer import EOS_TOKEN, PAD_TOKEN, BastionTokenizer

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "héllo wörld",
    "日本語のテキスト",
    "emoji 🎉🚀",
] * 25


@pytest.fixture(scope="module")
def tok() -> BastionTokenizer:
    return BastionTokenizer.train(iter(CORPUS), vocab_size=320, min_frequency=2)


@pytest.mark.parametrize(
    "text",
    [
        "plain ASCII, with punctuation!",
        "  leading spaces\n\ttabs and newlines\r\n",
        "emoji 🎉 and a family 👩‍👩‍👧 and flags 🇫🇷",
        "CJK 中文 日本語 한국어",
        "combining: e\u0301 a\u0308 n\u0303",  # decomposed -> composed by NFC
        "unseen bytes: \x00\x7f \u2028 \U0010ffff",
        "",
    ],
)
def test_round_trip_is_nfc(tok: BastionTokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_any_unicode(text: str) -> None:
    tok = _shared()
    assert tok.decode(tok.encode(text)) == unicodedata.normalize("NFC", text)


_TOK: list[BastionTokenizer] = []


def _shared() -> BastionTokenizer:  # hypothesis forbids function-scoped fixtures
    if not _TOK:
        _TOK.append(BastionTokenizer.train(iter(CORPUS), vocab_size=300, min_frequency=2))
    return _TOK[0]


def test_specials_and_vocab(tok: BastionTokenizer) -> None:
    assert tok.eos_id == tok.token_to_id(EOS_TOKEN)
    assert tok.pad_id == tok.token_to_id(PAD_TOKEN)
    assert tok.eos_id != tok.pad_id
    assert 258 < tok.vocab_size <= 320
    assert tok.decode([tok.eos_id]) == EOS_TOKEN
    assert tok.decode([tok.eos_id], skip_special_tokens=True) == ""


def test_literal_special_text_is_not_the_special_id(tok: BastionTokenizer) -> None:
    ids = tok.encode(f"a{EOS_TOKEN}b{PAD_TOKEN}")
    assert tok.eos_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == f"a{EOS_TOKEN}b{PAD_TOKEN}"


def test_encode_batch_matches_encode(tok: BastionTokenizer) -> None:
    texts = ["hello", "", "日本語", "fox 🎉"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_decode_rejects_out_of_range(tok: BastionTokenizer) -> None:
    with pytest.raises(ValueError, match="outside vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError):
        tok.decode([-1])


def test_training_is_deterministic() -> None:
    a = BastionTokenizer.train(iter(CORPUS), vocab_size=300, min_frequency=2)
    b = BastionTokenizer.train(iter(CORPUS), vocab_size=300, min_frequency=2)
    assert a.to_json_str() == b.to_json_str()


def test_save_load(tok: BastionTokenizer, tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    loaded = BastionTokenizer.from_file(path)
    assert loaded.to_json_str() == tok.to_json_str()
    assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (tok.eos_id, tok.pad_id, tok.vocab_size)
    assert loaded.encode("the lazy 🎉") == tok.encode("the lazy 🎉")
    assert BastionTokenizer.from_json_str(tok.to_json_str()).encode("fox") == tok.encode("fox")
    # the injection guard survives a reload
    assert loaded.eos_id not in loaded.encode(EOS_TOKEN)


def test_from_file_missing(tmp_path) -> None:
    with pytest.raises(DataError, match="not found"):
        BastionTokenizer.from_file(tmp_path / "nope.json")


def test_from_file_oversized(tok: BastionTokenizer, tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    with pytest.raises(DataError, match=r"tokenizer\.json.*limit of 100 bytes"):
        BastionTokenizer.from_file(path, max_bytes=100)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe binary", b'{"version": "1.0"}', b"[]"])
def test_from_file_invalid(tmp_path, content: bytes) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataError, match="bad.json"):
        BastionTokenizer.from_file(path)


def _without(tok: BastionTokenizer, token: str) -> dict:
    data = json.loads(tok.to_json_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != token]
    del data["model"]["vocab"][token]
    return data


def test_from_file_missing_eos(tok: BastionTokenizer, tmp_path) -> None:
    path = tmp_path / "nospecial.json"
    path.write_text(json.dumps(_without(tok, EOS_TOKEN)))
    with pytest.raises(DataError, match=r"nospecial\.json.*<\|endoftext\|>"):
        BastionTokenizer.from_file(path)


def test_missing_pad_falls_back_to_eos(tok: BastionTokenizer) -> None:
    # Imported models often have no pad token; padding never carries loss or attention.
    t = BastionTokenizer.from_json_str(json.dumps(_without(tok, PAD_TOKEN)))
    assert t.pad_id == t.eos_id == tok.eos_id


def test_ids_with_a_gap_count_in_vocab_size(tok: BastionTokenizer) -> None:
    """Without its pad token (id 1) the vocabulary skips an id: vocab_size is the id space a
    model's embedding needs, so the last id still decodes."""
    t = BastionTokenizer.from_json_str(json.dumps(_without(tok, PAD_TOKEN)))
    assert t.vocab_size == t.max_id + 1 == tok.vocab_size
    assert t.decode([t.max_id]) == tok.decode([tok.max_id])


@pytest.mark.parametrize("token_id", [10_000, 2**32 - 1])
def test_id_far_past_the_vocabulary_refused(tok: BastionTokenizer, token_id: int) -> None:
    """An id the file merely claims must never size a model's embedding."""
    data = json.loads(tok.to_json_str())
    data["model"]["vocab"]["a"] = token_id
    with pytest.raises(DataError, match=f"token id {token_id}, far past its"):
        BastionTokenizer.from_json_str(json.dumps(data))


def test_named_special_tokens(tok: BastionTokenizer) -> None:
    # A Hugging Face tokenizer names its own eos / pad; they must exist in the vocabulary.
    t = BastionTokenizer.from_json_str(tok.to_json_str(), eos_token=PAD_TOKEN, pad_token=EOS_TOKEN)
    assert (t.eos_id, t.pad_id) == (tok.pad_id, tok.eos_id)
    with pytest.raises(DataError, match=r"<\|im_end\|>"):
        BastionTokenizer.from_json_str(tok.to_json_str(), eos_token="<|im_end|>")
    assert "<|endoftext|>" not in [tok.decode([i]) for i in tok.encode("a <|endoftext|> b")]


def test_save_does_not_follow_symlink_tmp(tok: BastionTokenizer, tmp_path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep")
    out = tmp_path / "tokenizer.json"
    os.symlink(target, tmp_path / f".tokenizer.json.tmp-{os.getpid()}")
    with pytest.raises(OSError):
        tok.save(out)
    assert target.read_text() == "keep"
