"""Fine-tuning data: record validation (file:line), packing, masks, preference pairs, resume."""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bastion.config.schema import FinetuneConfig
from bastion.data.finetune import (
    IGNORE_INDEX,
    PreferenceDataset,
    SFTDataset,
    load_preferences,
    load_sft,
)
from synthetic.chat import (
    greeting_preference_records,
    held_out_greeting_prompts,
    held_out_reverse_prompts,
    reverse_chat_records,
    reverse_reply,
    write_jsonl,
)
from bastion.errors import DataError
from bastion.tokenizer import BastionTokenizer
from bastion.tokenizer.chat import ChatFormat

CORPUS = [json.dumps(r) for r in reverse_chat_records(200, seed=1)] + [
    json.dumps(r) for r in greeting_preference_records(200, seed=1)
]


@pytest.fixture(scope="module")
def tok() -> BastionTokenizer:
    return BastionTokenizer.train(iter(CORPUS), vocab_size=320)


@pytest.fixture(scope="module")
def chat(tok) -> ChatFormat:
    return ChatFormat(tok)


def _cfg(**kw) -> FinetuneConfig:
    return FinetuneConfig(**{"max_length": 256, **kw})


def _sft(tmp_path, chat, records, name="train.jsonl", **cfg):
    path = write_jsonl(tmp_path / name, records)
    return load_sft(path, chat, _cfg(**cfg), [str(tmp_path)])


def _segments(row_segments: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) runs of equal segment id in one row."""
    runs, start = [], 0
    seg = row_segments.tolist()
    for t in range(1, len(seg) + 1):
        if t == len(seg) or seg[t] != seg[start]:
            runs.append((start, t))
            start = t
    return runs


# ---- loading and validation -----------------------------------------------------------------


def test_load_sft_tokenizes_with_the_chat_template(tmp_path, chat, tok) -> None:
    records = reverse_chat_records(50, seed=0)
    ds = _sft(tmp_path, chat, records)
    assert len(ds) == 50 and ds.report.kept == 50 and not ds.report.dropped_too_long
    ids, mask = ds.example(3)
    assert tok.decode(ids) == chat.render(records[3]["messages"])
    answer = records[3]["messages"][-1]["content"]
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == answer + "<|endoftext|>"


BAD_LINES = [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}', None),
    ("this is not json", "not valid JSON"),
    ('"just a string"', "must be a JSON object"),
    ('{"text": "no messages"}', "missing field 'messages'"),
    ('{"messages": [{"role": "wizard", "content": "hi"}]}', "role 'wizard'"),
    ('{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}]}', "empty content"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}', "must be a string"),
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}', "out of order"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}', "out of order"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}, {"role": "system", "content": "s"}, {"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}]}', "system message may only come first"),
    ('{"messages": [{"role": "user", "content": "a"}]}', "last message is user"),
    ('{"messages": []}', "no messages"),
    ('{"messages": [{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": "b"}]}', "unsupported key"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "b"}]}', "lone surrogate"),
]


def test_bad_records_are_reported_with_file_and_line(tmp_path, chat) -> None:
    path = tmp_path / "bad.jsonl"
    # a blank line and a non-UTF-8 line too; line numbers count every physical line
    body = "\n".join(line for line, _ in BAD_LINES) + "\n\n"
    path.write_bytes(body.encode() + b'{"messages": "\xff"}\n')
    with pytest.raises(DataError) as info:
        load_sft(path, chat, _cfg(), [str(tmp_path)])
    text = str(info.value)
    assert f"{len(BAD_LINES)} invalid record(s)" in text  # 13 bad JSON lines + the non-UTF-8 one
    for lineno, (_, expected) in enumerate(BAD_LINES, start=1):
        if expected is None:
            assert f"{path}:{lineno}:" not in text
        else:
            assert f"{path}:{lineno}: " in text and expected in text.split(f"{path}:{lineno}: ")[1].split("\n")[0]
    assert f"{path}:{len(BAD_LINES) + 2}: not valid UTF-8" in text


def test_too_long_examples_are_dropped_and_counted(tmp_path, chat) -> None:
    records = reverse_chat_records(20, seed=0)
    records.insert(5, {"messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "y"}]})
    ds = _sft(tmp_path, chat, records, max_length=120)
    assert len(ds) == 20 and ds.report.dropped_too_long == 1
    assert "1 dropped as longer than finetune.max_length" in ds.report.describe()
    with pytest.raises(DataError, match="no usable examples"):
        _sft(tmp_path, chat, records[5:6], name="only_long.jsonl", max_length=120)


def test_max_examples_and_file_limits(tmp_path, chat) -> None:
    ds = _sft(tmp_path, chat, reverse_chat_records(30, seed=0), max_examples=10)
    assert len(ds) == 10 and ds.report.truncated
    path = write_jsonl(tmp_path / "big.jsonl", reverse_chat_records(30, seed=0))
    with pytest.raises(DataError, match="max_file_bytes"):
        load_sft(path, chat, _cfg(max_file_bytes=100), [str(tmp_path)])


def test_files_are_confined_to_allowed_roots(tmp_path, chat) -> None:
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    path = write_jsonl(outside / "train.jsonl", reverse_chat_records(5, seed=0))
    with pytest.raises(DataError, match="outside the allowed roots"):
        load_sft(path, chat, _cfg(), [str(inside)])
    os.symlink(path, inside / "link.jsonl")
    with pytest.raises(DataError, match="symlink"):
        load_sft(inside / "link.jsonl", chat, _cfg(), [str(inside)])
    with pytest.raises(DataError, match=r"'\.\.'"):
        load_sft(f"{inside}/../out/train.jsonl", chat, _cfg(), [str(tmp_path)])
    with pytest.raises(DataError, match="not found"):
        load_sft(inside / "missing.jsonl", chat, _cfg(), [str(inside)])


# ---- SFT batches ----------------------------------------------------------------------------


def _examples(seed: int, n: int = 40) -> list[tuple[list[int], list[bool]]]:
    """Synthetic examples of varied lengths with distinct ids per example (to track them)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(2, 30))
        ids = [1000 + 100 * i + j for j in range(length)]
        mask = [bool(b) for b in rng.integers(0, 2, length)]
        out.append((ids, mask))
    return out


@pytest.mark.parametrize("assistant_only_loss", [True, False])
def test_packing_rows_segments_labels_and_coverage(assistant_only_loss) -> None:
    examples = _examples(0)
    ds = SFTDataset(examples, pad_id=7, pack=True, assistant_only_loss=assistant_only_loss)
    seq_len = 48
    seen: Counter = Counter()
    for batch in ds.batches(batch_size=3, seq_len=seq_len, seed=5, epoch=0):
        ids, labels, segs = batch["input_ids"], batch["labels"], batch["segment_ids"]
        assert ids.shape == labels.shape == segs.shape and ids.shape[1] == seq_len and ids.dtype == torch.int64
        for r in range(ids.shape[0]):
            runs = _segments(segs[r])
            assert [int(segs[r, s]) for s, _ in runs] == list(range(len(runs)))  # 0, 1, 2, ... left to right
            for s, e in runs:
                row_ids = ids[r, s:e].tolist()
                if row_ids[0] == 7:  # the padding run: its own segment, no loss, only at the end
                    assert e == seq_len and set(row_ids) == {7} and (labels[r, s:e] == IGNORE_INDEX).all()
                    continue
                k = (row_ids[0] - 1000) // 100
                ex_ids, ex_mask = examples[k]
                assert row_ids == ex_ids
                seen[k] += 1
                expected = [ex_ids[t + 1] if (ex_mask[t + 1] or not assistant_only_loss) else IGNORE_INDEX
                            for t in range(len(ex_ids) - 1)] + [IGNORE_INDEX]
                assert labels[r, s:e].tolist() == expected  # last token of every example: -100
    assert seen == Counter(range(len(examples)))  # every example exactly once per epoch


def test_unpacked_batches_pad_to_the_longest() -> None:
    examples = _examples(1, n=10)
    ds = SFTDataset(examples, pad_id=7, pack=False)
    batches = list(ds.batches(batch_size=4, seq_len=64, seed=0, epoch=0, shuffle=False))
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    first = batches[0]
    lengths = [len(examples[i][0]) for i in range(4)]
    assert first["input_ids"].shape[1] == max(lengths)
    for r, n in enumerate(lengths):
        assert first["input_ids"][r, :n].tolist() == examples[r][0]
        assert (first["input_ids"][r, n:] == 7).all() and (first["labels"][r, n - 1:] == IGNORE_INDEX).all()
        assert first["segment_ids"][r].tolist() == [0] * n + [1] * (max(lengths) - n)


def test_packed_loss_equals_separate_examples(tmp_path, chat, tok) -> None:
    from bastion.config.presets import model_config
    from bastion.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(model_config("tiny", vocab_size=tok.vocab_size, max_seq_len=128)).eval()
    ds = _sft(tmp_path, chat, reverse_chat_records(12, seed=3))
    packed = next(ds.batches(batch_size=64, seq_len=128, seed=0, epoch=0))

    def token_loss_sum(batch, use_segments):
        kw = {"segment_ids": batch["segment_ids"]} if use_segments else {}
        logits, _ = model(batch["input_ids"], **kw)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum")

    separate = SFTDataset([ds.example(i) for i in range(len(ds))], pad_id=tok.pad_id, pack=False)
    total = sum(token_loss_sum(b, False) for b in separate.batches(batch_size=1, seq_len=128, seed=0, epoch=0))
    with torch.no_grad():
        assert torch.allclose(token_loss_sum(packed, True), total, rtol=1e-4)


def test_batches_are_deterministic_and_seq_len_is_checked() -> None:
    ds = SFTDataset(_examples(2), pad_id=0)
    a = [b["input_ids"] for b in ds.batches(4, 40, seed=1, epoch=0)]
    b = [b["input_ids"] for b in ds.batches(4, 40, seed=1, epoch=0)]
    c = [b["input_ids"] for b in ds.batches(4, 40, seed=1, epoch=1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    with pytest.raises(DataError, match="train.seq_len"):
        ds.cursor(batch_size=4, seq_len=10, seed=0)


def test_cursor_resumes_exactly_and_refuses_other_data() -> None:
    ds = SFTDataset(_examples(3), pad_id=0)
    straight = ds.cursor(batch_size=2, seq_len=40, seed=9)
    expected = [straight.next_batch() for _ in range(25)]  # crosses an epoch boundary
    assert straight.epoch >= 1

    first = ds.cursor(batch_size=2, seq_len=40, seed=9)
    for _ in range(11):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = SFTDataset(_examples(3), pad_id=0).cursor(batch_size=2, seq_len=40, seed=9)
    resumed.load_state_dict(state)
    for want in expected[11:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)

    other = SFTDataset(_examples(4), pad_id=0).cursor(batch_size=2, seq_len=40, seed=9)
    with pytest.raises(DataError, match="fingerprint"):
        other.load_state_dict(state)
    with pytest.raises(DataError, match="batch_size"):
        ds.cursor(batch_size=3, seq_len=40, seed=9).load_state_dict(state)


# ---- preference -----------------------------------------------------------------------------


def test_preference_chat_form_masks_cover_only_responses(tmp_path, chat, tok) -> None:
    records = greeting_preference_records(16, seed=0, chat=True)
    ds = load_preferences(write_jsonl(tmp_path / "pref.jsonl", records), chat, _cfg(), [str(tmp_path)])
    assert isinstance(ds, PreferenceDataset) and len(ds) == 16
    batch = next(ds.batches(batch_size=16, seq_len=256, seed=0, epoch=0, shuffle=False))
    assert batch["chosen_ids"].shape == batch["rejected_ids"].shape
    for r, rec in enumerate(records):
        prompt_ids = chat.encode_prompt(rec["prompt"])
        for which in ("chosen", "rejected"):
            ids, labels = batch[f"{which}_ids"][r], batch[f"{which}_labels"][r]
            assert ids[: len(prompt_ids)].tolist() == prompt_ids
            targets = [int(t) for t in labels if t != IGNORE_INDEX]
            assert tok.decode(targets) == rec[which][0]["content"] + "<|endoftext|>"
            assert (labels[: len(prompt_ids) - 1] == IGNORE_INDEX).all()  # nothing in the prompt is scored


def test_preference_string_forms(tmp_path, chat, tok) -> None:
    records = greeting_preference_records(4, seed=0, chat=False)
    path = write_jsonl(tmp_path / "pref.jsonl", records)
    templated = load_preferences(path, chat, _cfg(), [str(tmp_path)])
    ids, _ = templated.sequence(0, "chosen")
    assert tok.decode(ids.tolist()) == chat.render(
        [{"role": "user", "content": records[0]["prompt"]}, {"role": "assistant", "content": records[0]["chosen"]}])
    raw = load_preferences(path, chat, _cfg(), [str(tmp_path)], raw_strings=True)
    ids, loss = raw.sequence(0, "rejected")
    assert tok.decode(ids.tolist()) == records[0]["prompt"] + records[0]["rejected"] + "<|endoftext|>"
    assert tok.decode(ids[loss].tolist()) == records[0]["rejected"] + "<|endoftext|>"


def test_bad_preference_records(tmp_path, chat) -> None:
    u = [{"role": "user", "content": "hi"}]
    a = [{"role": "assistant", "content": "yo"}]
    b = [{"role": "assistant", "content": "no"}]
    lines = [
        {"prompt": "p", "chosen": "c", "rejected": "r"},
        {"prompt": "p", "chosen": "c"},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": a, "rejected": b},
        {"prompt": u, "chosen": u, "rejected": b},
        {"prompt": a, "chosen": a, "rejected": b},
        {"prompt": u, "chosen": [], "rejected": b},
        {"prompt": "", "chosen": "c", "rejected": "r"},
        {"prompt": u, "chosen": a, "rejected": a},
        {"prompt": u, "chosen": a, "rejected": b},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_preferences(path, chat, _cfg(), [str(tmp_path)])
    text = str(info.value)
    for lineno, expected in [(2, "missing field(s) 'rejected'"), (3, "identical"), (4, "all be strings or all be"),
                             (5, "'chosen': message 0: roles out of order"), (6, "'prompt': message 0: roles out of order"),
                             (7, "'chosen': no messages"), (8, "'prompt' is empty"), (9, "identical")]:
        assert f"{path}:{lineno}: " in text and expected in text.split(f"{path}:{lineno}: ")[1].split("\n")[0]
    assert f"{path}:1:" not in text and f"{path}:10:" not in text


def test_sequence_logprobs_sums_response_tokens(tmp_path, chat, tok) -> None:
    from bastion.config.presets import model_config
    from bastion.model.transformer import Transformer
    from bastion.train.tasks.preference import sequence_logprobs

    torch.manual_seed(0)
    model = Transformer(model_config("tiny", vocab_size=tok.vocab_size, max_seq_len=128)).eval()
    ds = load_preferences(write_jsonl(tmp_path / "p.jsonl", greeting_preference_records(6, seed=2)), chat, _cfg(),
                          [str(tmp_path)])
    batch = next(ds.batches(batch_size=6, seq_len=128, seed=0, epoch=0, shuffle=False))
    with torch.no_grad():
        out = sequence_logprobs(model, batch)
        for r in range(6):
            for which, got, count in (("chosen", out.chosen, out.chosen_tokens), ("rejected", out.rejected, out.rejected_tokens)):
                ids, loss = ds.sequence(r, which)
                logits, _ = model(torch.tensor(ids[None].astype(np.int64)))
                logp = torch.log_softmax(logits[0].float(), -1)
                want = sum(float(logp[t - 1, ids[t]]) for t in range(1, len(ids)) if loss[t])
                assert count[r] == int(loss.sum()) and abs(float(got[r]) - want) < 1e-3
    # gradients flow through the policy's log-probabilities
    model.train()
    sequence_logprobs(model, batch).chosen.sum().backward()
    assert model.tok_embeddings.weight.grad is not None


def test_preference_cursor_resume() -> None:
    pairs = [([5, 6, i], [7, i], [True, True], [8, 9, i], [False, True, True]) for i in range(10, 30)]
    ds = PreferenceDataset(pairs, pad_id=0)
    cur = ds.cursor(batch_size=3, seq_len=16, seed=4)
    for _ in range(8):
        cur.next_batch()
    want = cur.next_batch()
    again = PreferenceDataset(pairs, pad_id=0).cursor(batch_size=3, seq_len=16, seed=4)
    state = cur.state_dict()
    state["position"] -= 1
    again.load_state_dict(state)
    got = again.next_batch()
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---- synthetic tasks ------------------------------------------------------------------------


def test_synthetic_tasks_are_deterministic_and_hold_out_prompts() -> None:
    assert reverse_chat_records(30, seed=4) == reverse_chat_records(30, seed=4)
    trained = {r["messages"][-2]["content"] for r in reverse_chat_records(2000, seed=0)}
    held = held_out_reverse_prompts(20, seed=0)
    assert len(held) == 20 and not {p[-1]["content"] for p, _ in held} & trained
    assert reverse_reply("abc") == "<r>c b a</r>"
    prefs = greeting_preference_records(500, seed=0)
    assert all(p["chosen"][0]["content"].startswith("Hello, ") and p["chosen"] != p["rejected"] for p in prefs)
    prompts = {p["prompt"][0]["content"] for p in prefs}
    held_g = held_out_greeting_prompts(10, seed=0)
    assert held_g and not {p[0]["content"] for p, _ in held_g} & prompts


def test_a_huge_jsonl_line_is_refused_while_reading(tmp_path, chat, monkeypatch):
    import bastion.data.finetune as finetune

    monkeypatch.setattr(finetune, "MAX_RECORD_BYTES", 1000)  # (64 MiB in use; small here to stay fast)
    path = tmp_path / "huge.jsonl"
    path.write_bytes(b'{"messages": "' + b"x" * 5000)  # no newline: the whole file is one line
    with pytest.raises(DataError, match=r"huge\.jsonl:1: a document longer than the record limit = 1000"):
        load_sft(path, chat, _cfg(), [str(tmp_path)])


def test_tool_call_conversations_train_on_the_call_text(tmp_path, chat, tok) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{\"q\": \"x\"}"}}
    record = {"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
              "messages": [{"role": "user", "content": "find x"},
                           {"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "c1", "content": "found"},
                           {"role": "assistant", "content": "done"}]}
    ds = _sft(tmp_path, chat, [record] * 3, max_length=1024)
    ids, mask = ds.example(0)
    learned = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learned == ('<tool_call>\n{"name": "lookup", "arguments": {"q": "x"}}\n</tool_call><|endoftext|>'
                       "done<|endoftext|>")
    assert "<tools>" in tok.decode(ids)
    bad = dict(record, messages=[record["messages"][0], {"role": "assistant", "tool_calls": [
        {"function": {"name": "lookup", "arguments": "{nope"}}]}])
    path = write_jsonl(tmp_path / "bad.jsonl", [bad])
    with pytest.raises(DataError, match="arguments: not valid JSON"):
        load_sft(path, chat, _cfg(), [str(tmp_path)])
