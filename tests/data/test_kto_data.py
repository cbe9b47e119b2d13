"""KTO data: labelled completions validated line by line (file:line), their mismatched KL
sequences (another prompt's completion, never a neighbour with the same prompt), batches
and the resume fingerprint."""
from __future__ import annotations

import json

import numpy as np
import pytest

from bastion.config.schema import FinetuneConfig
from bastion.data.finetune import IGNORE_INDEX, KTODataset, kl_partners, load_kto
from bastion.errors import DataError
from bastion.tokenizer import BastionTokenizer
from bastion.tokenizer.chat import ChatFormat
from synthetic.chat import greeting_kto_records, write_jsonl


@pytest.fixture(scope="module")
def tok() -> BastionTokenizer:
    return BastionTokenizer.train(iter(json.dumps(r) for r in greeting_kto_records(200, seed=1)), vocab_size=320)


@pytest.fixture(scope="module")
def chat(tok) -> ChatFormat:
    return ChatFormat(tok)


def _cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"max_length": 256, **kw})


def test_chat_form_masks_labels_and_kl_sequences(tmp_path, chat, tok) -> None:
    records = greeting_kto_records(8, seed=0)  # (p0, polite, true), (p0, rude, false), (p1, ...), ...
    ds = load_kto(write_jsonl(tmp_path / "kto.jsonl", records), chat, _cfg(), [str(tmp_path)])
    assert isinstance(ds, KTODataset) and len(ds) == 8 and ds.counts == (4, 4)
    batch = next(ds.batches(batch_size=8, seq_len=256, seed=0, epoch=0, shuffle=False))
    assert batch["desirable"].tolist() == [True, False] * 4 and batch["index"].tolist() == list(range(8))
    # Rows 0 and 1 share a prompt, so both take their KL completion from row 2; row 7 wraps to row 0.
    assert ds.partners.tolist() == [2, 2, 4, 4, 6, 6, 0, 0]
    for r, rec in enumerate(records):
        prompt_ids = chat.encode_prompt(rec["prompt"])
        partner = records[int(ds.partners[r])]
        for prefix, completion in (("", rec["completion"]), ("kl_", partner["completion"])):
            ids, labels = batch[f"{prefix}ids"][r], batch[f"{prefix}labels"][r]
            assert ids[: len(prompt_ids)].tolist() == prompt_ids
            assert (labels[: len(prompt_ids) - 1] == IGNORE_INDEX).all()  # nothing in the prompt is scored
            targets = [int(t) for t in labels if t != IGNORE_INDEX]
            assert tok.decode(targets) == completion[0]["content"] + "<|endoftext|>"
    want = sum(len(ds.sequence(i)[0]) + len(ds.sequence(i, kl=True)[0]) for i in range(8))
    assert int(batch["num_tokens"]) == want


def test_string_forms_templated_and_raw(tmp_path, chat, tok) -> None:
    records = greeting_kto_records(4, seed=0, chat=False)
    path = write_jsonl(tmp_path / "kto.jsonl", records)
    ids, _ = load_kto(path, chat, _cfg(), [str(tmp_path)]).sequence(1)
    assert tok.decode(ids.tolist()) == chat.render(
        [{"role": "user", "content": records[1]["prompt"]}, {"role": "assistant", "content": records[1]["completion"]}])
    raw = load_kto(path, chat, _cfg(), [str(tmp_path)], raw_strings=True)
    ids, loss = raw.sequence(0, kl=True)  # prompt 0 + the completion of row 2 (the next other prompt)
    assert tok.decode(ids.tolist()) == records[0]["prompt"] + records[2]["completion"] + "<|endoftext|>"
    assert tok.decode(ids[loss].tolist()) == records[2]["completion"] + "<|endoftext|>"


def test_kl_partners_skip_equal_prompts_and_wrap() -> None:
    p = [np.array(x, dtype=np.int32) for x in ([1], [1], [2], [3], [3], [1], [1])]
    # the last run ([1] at 5, 6) wraps past the first run (also [1]) to index 2
    assert kl_partners(p).tolist() == [2, 2, 3, 5, 5, 2, 2]
    assert kl_partners([np.array([1]), np.array([2])]).tolist() == [1, 0]
    with pytest.raises(DataError, match="same prompt"):
        kl_partners([np.array([4, 5])] * 3)


def test_kl_sequences_are_never_longer_than_the_longest_example() -> None:
    # a long prompt meets a long completion: the KL completion is cut to fit 3 + 4 = 7 tokens
    examples = [([1, 2, 3], [9], [True], True), ([4], [5, 6, 7, 8, 9, 10], [True] * 6, False)]
    ds = KTODataset(examples, pad_id=0)
    assert ds.max_length == 7
    ids, loss = ds.sequence(0, kl=True)
    assert ids.tolist() == [1, 2, 3, 5, 6, 7, 8] and loss.tolist() == [False] * 3 + [True] * 4
    assert ds.sequence(1, kl=True)[0].tolist() == [4, 9]
    with pytest.raises(DataError, match="train.seq_len = 6"):
        ds.plan(batch_size=2, seq_len=6, seed=0, epoch=0)


def test_bad_kto_records_name_file_and_line(tmp_path, chat) -> None:
    u = [{"role": "user", "content": "hi"}]
    a = [{"role": "assistant", "content": "yo"}]
    lines = [
        {"prompt": "p", "completion": "c", "label": True},
        {"prompt": "p", "completion": "c", "label": "true"},
        {"prompt": "p", "completion": "c", "label": 1},
        {"prompt": "p", "completion": "c"},
        {"prompt": "p", "label": False},
        {"prompt": "p", "completion": a, "label": False},
        {"prompt": u, "completion": u, "label": True},
        {"prompt": "p", "completion": " ", "label": True},
        {"prompt": u, "completion": [], "label": True},
        ["p", "c", True],
        {"prompt": "p", "completion": "c", "label": None},
        {"prompt": u, "completion": a, "label": False},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_kto(path, chat, _cfg(), [str(tmp_path)])
    text = str(info.value)
    assert "10 invalid record(s)" in text
    for lineno, expected in [(2, "'label' must be true (desirable) or false (undesirable), a JSON boolean; got \"true\""),
                             (3, "a JSON boolean; got 1"), (4, "missing field(s) 'label'"),
                             (5, "missing field(s) 'completion'"), (6, "must both be strings or both be message lists"),
                             (7, "'completion': message 0: roles out of order"), (8, "'completion' is empty"),
                             (9, "'completion': no messages"), (10, "record must be a JSON object, got list"),
                             (11, "got null")]:
        assert f"{path}:{lineno}: " in text and expected in text.split(f"{path}:{lineno}: ")[1].split("\n")[0], lineno
    assert f"{path}:1:" not in text and f"{path}:12:" not in text


def test_one_prompt_for_everything_is_refused_with_the_file(tmp_path, chat) -> None:
    path = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "completion": c, "label": c == "yes"}
                                                 for c in ("yes", "no", "maybe")])
    with pytest.raises(DataError, match=r"same.jsonl: every example has the same prompt"):
        load_kto(path, chat, _cfg(), [str(tmp_path)])


def test_fingerprint_covers_labels_and_cursor_resumes() -> None:
    examples = [([5, i % 7 + 1], [7, i], [True, True], i % 3 == 0) for i in range(20)]
    ds = KTODataset(examples, pad_id=0)
    flipped = KTODataset([e[:3] + (not e[3],) for e in examples], pad_id=0)
    assert ds.fingerprint() != flipped.fingerprint()  # a relabelled file is other data
    a = ds.cursor(batch_size=6, seq_len=16, seed=1)
    seen = [a.next_batch()["index"].tolist() for _ in range(5)]
    b = ds.cursor(batch_size=6, seq_len=16, seed=1)
    b.load_state_dict(ds.cursor(batch_size=6, seq_len=16, seed=1).state_dict() | {"position": 2})
    assert b.next_batch()["index"].tolist() == seen[2]
    with pytest.raises(DataError, match="fingerprint"):
        flipped.cursor(batch_size=6, seq_len=16, seed=1).load_state_dict(a.state_dict())
