"""Fine-tuning data: chat JSONL for SFT, preference JSONL for DPO/SimPO/ORPO, labelled
completions for KTO.

Files. One JSON object per line (blank lines skipped). The file must resolve inside
`data.allowed_roots` and be at most `finetune.max_file_bytes`; it is streamed, never read
whole. Every record is validated and every problem is reported as `file:line: what`
(all of a file's problems are counted, the first 20 are listed, and loading fails).
Records longer than `finetune.max_length` tokens are not errors: they are dropped and
counted in the `LoadReport`. Reading stops after `finetune.max_examples` kept examples.
Unknown top-level keys (ids, metadata) are ignored; unknown keys inside a message are
refused (a `tool_calls` field silently dropped would change what the example teaches).

    chat:        {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}
    preference:  {"prompt": "...", "chosen": "...", "rejected": "..."}
                 {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
    kto:         {"prompt": "...", "completion": "...", "label": true|false}
                 {"prompt": [messages], "completion": [messages], "label": true|false}
                 (true = desirable; the label must be a JSON boolean, never "yes" or 1)

Conversation rules: an optional system message first, then user; a user message is
followed by an assistant one; an assistant message by a user or tool message; a tool
message by a tool or assistant one. Contents are non-empty strings. An SFT conversation
ends with an assistant message; a preference prompt ends with a user (or tool) message and
its chosen/rejected (KTO: completion) continuations start with an assistant message.
chosen != rejected.
String-form preference records are a single user turn and a single assistant reply,
rendered with the chat template (so DPO sees what SFT and chat generation see); with
`raw_strings=True` they are plain text instead (prompt ids + reply ids + eos) for base
models.

Batches. Everything is "already shifted": `input_ids[t]` is a token and `labels[t]` the
token the model must predict from it, or -100 (no loss). The last token of every example
has label -100, so nothing predicts across examples. Padding is `pad_id` with label -100.

  * SFT, packed: examples (in a seeded order) are placed greedily into rows of exactly
    `seq_len` tokens (next-fit); `segment_ids` numbers the examples of a row 0, 1, ... and
    the padding gets the next number, so attention never crosses examples
    (`Transformer.forward(..., segment_ids=...)`).
  * SFT, not packed: one example per row, right-padded to the batch's longest;
    `segment_ids` are 0 for the example and 1 for padding (causal attention already makes
    right padding harmless, so the loop may skip passing them and keep the fast path).
  * Preference: one pair per row; chosen and rejected padded to one common length so they
    can run as one batch of 2B rows (`sequence_logprobs`).
  * KTO: one completion per row, plus its mismatched "KL" row (the example's prompt with
    another prompt's completion, fixed per example by `kl_partners`), padded separately.

Order and resume. `plan(batch_size, seq_len, seed, epoch)` is a pure function of its
arguments and the data; `BatchCursor` (bastion/data/batches.py) walks plans epoch after epoch, and its state
(epoch, position, plus a fingerprint of the data and settings) restores it exactly.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bastion.errors import DataError
from bastion.safepath import Roots
from bastion.data.batches import BatchCursor
from bastion.tokenizer.chat import ChatFormat, ChatTooLongError, check_conversation
from bastion.tokenizer.tools import flatten as flatten_tools
from bastion.data.sources import bounded_lines
from bastion.safeio import parse_json

IGNORE_INDEX = -100
MAX_RECORD_BYTES = 64 * 2**20  # one JSONL line, read at most this far (examples are tokens, not megabytes)
MAX_LISTED_ERRORS = 20


# ---- reading and validating records ---------------------------------------------------------


@dataclass
class LoadReport:
    path: str
    lines: int = 0  # non-blank lines read
    kept: int = 0
    dropped_too_long: int = 0
    truncated: bool = False  # stopped at max_examples with lines left

    def describe(self) -> str:
        text = f"{self.path}: {self.kept} examples"
        if self.dropped_too_long:
            text += f", {self.dropped_too_long} dropped as longer than finetune.max_length"
        if self.truncated:
            text += " (stopped at finetune.max_examples)"
        return text


def iter_jsonl(path: Path, max_bytes: int) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, parsed value, None) per non-blank line, or (line number, None, error
    text) for a line that is not UTF-8 JSON. Refuses non-regular files and files over
    max_bytes (checked before and while streaming)."""
    if path.is_symlink() or not path.is_file():
        raise DataError(f"fine-tuning file not found (or not a regular file): {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(f"fine-tuning file {path} is {size} bytes, over finetune.max_file_bytes = {max_bytes}")
    total = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(bounded_lines(fh, MAX_RECORD_BYTES, str(path), "the record limit"), start=1):
            total += len(raw)
            if total > max_bytes:
                raise DataError(f"fine-tuning file {path} grew past finetune.max_file_bytes = {max_bytes} while being read")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, None, f"not valid UTF-8 (byte {exc.start} of the line)"
                continue
            if not line.strip():
                continue
            try:
                value = parse_json(raw, DataError, "line")
            except DataError as exc:
                yield lineno, None, str(exc).removeprefix("line: ")
                continue
            yield lineno, value, None


def parse_chat_record(record: Any) -> list[dict[str, str]]:
    """The validated messages of one chat record, or a DataError saying what is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"record must be a JSON object, got {type(record).__name__}")
    if "messages" not in record:
        raise DataError("missing field 'messages'")
    # Tool calls, tool results and a `tools` list become text exactly as the server writes
    # them (tokenizer/tools.py), so the model learns the calls it will be asked for.
    return check_conversation(flatten_tools(record["messages"], record.get("tools")), ends_with=("assistant",))


@dataclass(frozen=True)
class PreferenceRecord:
    """A validated pair: chat form (message lists) or string form (`prompt` etc. are str)."""

    prompt: str | list[dict[str, str]]
    chosen: str | list[dict[str, str]]
    rejected: str | list[dict[str, str]]

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


def _check_texts(fields: Sequence[tuple[str, str]]) -> None:
    """String-form fields: non-empty and encodable (a lone surrogate would fail at tokenization)."""
    for name, value in fields:
        if not value.strip():
            raise DataError(f"'{name}' is empty")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"'{name}' is not valid Unicode (lone surrogate)") from None


def _check_chat_prompt(prompt: Any) -> list[dict[str, str]]:
    try:
        return check_conversation(prompt, ends_with=("user", "tool"))
    except DataError as exc:
        raise DataError(f"'prompt': {exc}") from None


def _check_chat_reply(name: str, value: Any, prompt: list[dict[str, str]]) -> list[dict[str, str]]:
    """A continuation of `prompt`: starts with an assistant message, ends with one."""
    try:
        reply = check_conversation(value, ends_with=("assistant",), starts_after=prompt[-1]["role"])
    except DataError as exc:
        raise DataError(f"'{name}': {exc}") from None
    if reply[0]["role"] != "assistant":
        raise DataError(f"'{name}' must start with an assistant message")
    return reply


def _require_fields(record: Any, names: Sequence[str]) -> None:
    if not isinstance(record, dict):
        raise DataError(f"record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in names if k not in record]
    if missing:
        raise DataError(f"missing field(s) {', '.join(map(repr, missing))}")


def _mixed_forms(record: dict[str, Any], names: Sequence[str]) -> DataError:
    kinds = ", ".join(f"{k}: {type(record[k]).__name__}" for k in names)
    listed = ", ".join(f"'{k}'" for k in names[:-1]) + f" and '{names[-1]}'"
    every = "both" if len(names) == 2 else "all"
    return DataError(f"{listed} must {every} be strings or {every} be message lists ({kinds})")


def parse_preference_record(record: Any) -> PreferenceRecord:
    names = ("prompt", "chosen", "rejected")
    _require_fields(record, names)
    prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        _check_texts([("prompt", prompt), ("chosen", chosen), ("rejected", rejected)])
        if chosen == rejected:
            raise DataError("'chosen' and 'rejected' are identical")
        return PreferenceRecord(prompt, chosen, rejected)
    if all(isinstance(v, list) for v in (prompt, chosen, rejected)):
        p = _check_chat_prompt(prompt)
        responses = [_check_chat_reply(name, record[name], p) for name in ("chosen", "rejected")]
        if responses[0] == responses[1]:
            raise DataError("'chosen' and 'rejected' are identical")
        return PreferenceRecord(p, responses[0], responses[1])
    raise _mixed_forms(record, names)


@dataclass(frozen=True)
class KTORecord:
    """A validated labelled completion (KTO): chat form (message lists) or string form."""

    prompt: str | list[dict[str, str]]
    completion: str | list[dict[str, str]]
    desirable: bool


def parse_kto_record(record: Any) -> KTORecord:
    """{"prompt", "completion", "label"}; the label must be a JSON boolean, so a "yes", 1 or
    "false" (a string that is truthy) is refused instead of guessed at."""
    names = ("prompt", "completion")
    _require_fields(record, (*names, "label"))
    label = record["label"]
    if not isinstance(label, bool):
        shown = json.dumps(label, ensure_ascii=True)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise DataError(f"'label' must be true (desirable) or false (undesirable), a JSON boolean; got {shown}")
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        _check_texts([("prompt", prompt), ("completion", completion)])
        return KTORecord(prompt, completion, label)
    if isinstance(prompt, list) and isinstance(completion, list):
        p = _check_chat_prompt(prompt)
        return KTORecord(p, _check_chat_reply("completion", completion, p), label)
    raise _mixed_forms(record, names)


class _Errors:
    def __init__(self, path: Path):
        self.path, self.listed, self.count = path, [], 0

    def add(self, lineno: int, message: str) -> None:
        self.count += 1
        if len(self.listed) < MAX_LISTED_ERRORS:
            self.listed.append(f"{self.path}:{lineno}: {message}")

    def raise_if_any(self) -> None:
        if self.count:
            more = f"\n  ... and {self.count - len(self.listed)} more" if self.count > len(self.listed) else ""
            raise DataError(
                f"{self.count} invalid record(s) in {self.path}:\n  " + "\n  ".join(self.listed) + more
            )


# ---- flat example storage -------------------------------------------------------------------


class _Flat:
    """Variable-length sequences in one array: tokens[offsets[i]:offsets[i+1]]."""

    def __init__(self, seqs: Sequence[Sequence[int]], dtype: Any):
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        self.offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.data = np.fromiter((x for s in seqs for x in s), dtype=dtype, count=int(self.offsets[-1]))
        self.lengths = lengths

    def __getitem__(self, i: int) -> np.ndarray:
        return self.data[self.offsets[i] : self.offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.lengths)

    def digest(self, h: Any) -> None:
        h.update(self.offsets.tobytes())
        h.update(self.data.tobytes())


def _shifted_labels(ids: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """labels[t] = ids[t+1] where token t+1 carries loss, else -100; the last is -100."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(loss[1:], ids[1:], IGNORE_INDEX)
    return labels


class _Planned:
    """Shared by the datasets: seeded order, plans, cursor, fingerprint."""

    kind = "?"

    def __len__(self) -> int:
        raise NotImplementedError

    def _settings(self) -> str:
        raise NotImplementedError

    def _digest_data(self, h: Any) -> None:
        raise NotImplementedError

    def plan(self, batch_size: int, seq_len: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[list[int]]]:
        raise NotImplementedError

    def collate(self, rows: list[list[int]], seq_len: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def order(self, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
        if not shuffle:
            return np.arange(len(self))
        return np.random.default_rng([seed, epoch]).permutation(len(self))

    def batches(self, batch_size: int, seq_len: int, seed: int, epoch: int, shuffle: bool = True) -> Iterator[dict[str, torch.Tensor]]:
        """Every batch of one epoch, in order (deterministic in all arguments)."""
        for rows in self.plan(batch_size, seq_len, seed, epoch, shuffle):
            yield self.collate(rows, seq_len)

    def cursor(self, batch_size: int, seq_len: int, seed: int, shuffle: bool = True) -> BatchCursor:
        return BatchCursor(self, batch_size, seq_len, seed, shuffle)

    def fingerprint(self) -> str:
        """SHA-256 over the tokenized examples and loss settings: resume refuses other data."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256(f"{self.kind}|{self._settings()}|".encode())
            self._digest_data(h)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @staticmethod
    def _check_batching(batch_size: int, seq_len: int, longest: int) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError("batch_size and seq_len must be >= 1")
        if longest > seq_len:
            raise DataError(
                f"the longest example has {longest} tokens, more than train.seq_len = {seq_len}; "
                "set finetune.max_length <= train.seq_len (longer examples are then dropped) or raise train.seq_len"
            )


# ---- SFT ------------------------------------------------------------------------------------


class SFTDataset(_Planned):
    """Tokenized chat examples: ids plus a loss mask (assistant tokens, or every token)."""

    kind = "sft"

    def __init__(
        self,
        examples: Sequence[tuple[Sequence[int], Sequence[bool]]],
        *,
        pad_id: int,
        pack: bool = True,
        assistant_only_loss: bool = True,
        report: LoadReport | None = None,
    ):
        if not examples:
            raise DataError("no fine-tuning examples")
        for i, (ids, mask) in enumerate(examples):
            if len(ids) != len(mask) or len(ids) < 2:
                raise DataError(f"example {i}: needs >= 2 tokens and one mask flag per token")
        self.tokens = _Flat([e[0] for e in examples], np.int32)
        loss = [e[1] for e in examples] if assistant_only_loss else [[True] * len(e[0]) for e in examples]
        self.loss = _Flat(loss, np.bool_)
        self.pad_id = int(pad_id)
        self.pack = bool(pack)
        self.assistant_only_loss = bool(assistant_only_loss)
        self.report = report
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.offsets[-1])

    @property
    def max_length(self) -> int:
        return int(self.tokens.lengths.max())

    def example(self, i: int) -> tuple[list[int], list[bool]]:
        """Example i as (ids, loss mask)."""
        return self.tokens[i].tolist(), self.loss[i].tolist()

    def _settings(self) -> str:
        return f"pack={self.pack},assistant_only_loss={self.assistant_only_loss},pad={self.pad_id}"

    def _digest_data(self, h: Any) -> None:
        self.tokens.digest(h)
        self.loss.digest(h)

    def plan(self, batch_size: int, seq_len: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[list[int]]]:
        """Batches -> rows -> example indices for one epoch."""
        self._check_batching(batch_size, seq_len, self.max_length)
        order = self.order(seed, epoch, shuffle)
        if self.pack:
            rows: list[list[int]] = []
            current: list[int] = []
            used = 0
            lengths = self.tokens.lengths
            for i in order.tolist():
                n = int(lengths[i])
                if used + n > seq_len:
                    rows.append(current)
                    current, used = [], 0
                current.append(i)
                used += n
            if current:
                rows.append(current)
        else:
            rows = [[i] for i in order.tolist()]
        return [rows[k : k + batch_size] for k in range(0, len(rows), batch_size)]

    def collate(self, rows: list[list[int]], seq_len: int) -> dict[str, torch.Tensor]:
        """{input_ids, labels, segment_ids}, each [len(rows), T] int64: T = seq_len when
        packing, else the longest example of the batch."""
        width = seq_len if self.pack else max(int(self.tokens.lengths[r[0]]) for r in rows)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
        segments = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            pos = 0
            for seg, i in enumerate(row):
                ids = self.tokens[i]
                n = len(ids)
                input_ids[r, pos : pos + n] = ids
                labels[r, pos : pos + n] = _shifted_labels(ids, self.loss[i])
                segments[r, pos : pos + n] = seg
                pos += n
            if pos > width:
                raise DataError(f"row of {pos} tokens does not fit {width}")
            segments[r, pos:] = len(row)  # padding: a segment of its own
        return {
            "input_ids": torch.from_numpy(input_ids),
            "labels": torch.from_numpy(labels),
            "segment_ids": torch.from_numpy(segments),
            "num_tokens": torch.tensor(sum(int(self.tokens.lengths[i]) for row in rows for i in row)),
        }


def read_examples(path: str | os.PathLike[str], cfg: Any, roots: Roots | Sequence[str], what: str,
                   convert: Any) -> tuple[list[Any], LoadReport]:
    """The shared reading loop: every line validated, every problem collected as file:line,
    examples `convert(record)` finds too long (ChatTooLongError) dropped and counted,
    reading stopped at cfg.max_examples. Once a line has failed, later lines are still
    validated (`convert(record, validate_only=True)`) but not tokenized."""
    p = Roots(roots).confine(path, what, must_exist=True)
    report = LoadReport(str(p))
    errors = _Errors(p)
    examples: list[Any] = []
    for lineno, record, problem in iter_jsonl(p, cfg.max_file_bytes):
        if report.kept >= cfg.max_examples:
            report.truncated = True
            break
        report.lines += 1
        if problem is not None:
            errors.add(lineno, problem)
            continue
        try:
            example = convert(record, validate_only=errors.count > 0)
        except ChatTooLongError:
            report.dropped_too_long += 1
            continue
        except DataError as exc:
            errors.add(lineno, str(exc))
            continue
        if example is not None:
            examples.append(example)
            report.kept += 1
    errors.raise_if_any()
    if not examples:
        raise DataError(f"{p}: no usable examples ({report.dropped_too_long} longer than finetune.max_length = {cfg.max_length})")
    return examples, report


def load_sft(
    path: str | os.PathLike[str],
    chat: ChatFormat,
    cfg: Any,
    roots: Roots | Sequence[str],
    *,
    what: str = "finetune.train_file",
) -> SFTDataset:
    """Read, validate and tokenize a chat JSONL file into an SFTDataset. `cfg` is a
    FinetuneConfig (max_length, max_examples, max_file_bytes, pack, assistant_only_loss);
    `roots` is `data.allowed_roots`."""

    def convert(record: Any, validate_only: bool) -> tuple[list[int], list[bool]] | None:
        messages = parse_chat_record(record)
        if validate_only:
            return None
        ids, mask = chat.encode_conversation(messages)
        if len(ids) > cfg.max_length:
            raise ChatTooLongError("longer than finetune.max_length")
        return ids, mask

    examples, report = read_examples(path, cfg, roots, what, convert)
    return SFTDataset(
        examples, pad_id=chat.tokenizer.pad_id, pack=cfg.pack, assistant_only_loss=cfg.assistant_only_loss, report=report
    )


# ---- preference -----------------------------------------------------------------------------


class PreferenceDataset(_Planned):
    """Pairs of sequences sharing a prompt: prompt ids + chosen / rejected response ids,
    with a loss mask over the response (the tokens whose log-probabilities count)."""

    kind = "preference"

    def __init__(
        self,
        pairs: Sequence[tuple[Sequence[int], Sequence[int], Sequence[bool], Sequence[int], Sequence[bool]]],
        *,
        pad_id: int,
        report: LoadReport | None = None,
    ):
        """pairs: (prompt_ids, chosen_ids, chosen_mask, rejected_ids, rejected_mask); the
        masks cover the response ids (True = counts)."""
        if not pairs:
            raise DataError("no preference pairs")
        for i, (prompt, c, cm, r, rm) in enumerate(pairs):
            if not prompt or len(c) != len(cm) or len(r) != len(rm) or not any(cm) or not any(rm):
                raise DataError(f"pair {i}: needs a prompt and responses with at least one counted token")
        self.prompts = _Flat([p[0] for p in pairs], np.int32)
        self.chosen = _Flat([p[1] for p in pairs], np.int32)
        self.chosen_mask = _Flat([p[2] for p in pairs], np.bool_)
        self.rejected = _Flat([p[3] for p in pairs], np.int32)
        self.rejected_mask = _Flat([p[4] for p in pairs], np.bool_)
        self.pad_id = int(pad_id)
        self.report = report
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def max_length(self) -> int:
        p = self.prompts.lengths
        return int(max((p + self.chosen.lengths).max(), (p + self.rejected.lengths).max()))

    def _settings(self) -> str:
        return f"pad={self.pad_id}"

    def _digest_data(self, h: Any) -> None:
        for flat in (self.prompts, self.chosen, self.chosen_mask, self.rejected, self.rejected_mask):
            flat.digest(h)

    def sequence(self, i: int, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, loss mask) of pair i's full "chosen" or "rejected" sequence."""
        resp, mask = (self.chosen, self.chosen_mask) if which == "chosen" else (self.rejected, self.rejected_mask)
        prompt = self.prompts[i]
        ids = np.concatenate([prompt, resp[i]])
        loss = np.concatenate([np.zeros(len(prompt), dtype=np.bool_), mask[i]])
        return ids, loss

    def plan(self, batch_size: int, seq_len: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[list[int]]]:
        self._check_batching(batch_size, seq_len, self.max_length)
        return _one_per_row(self.order(seed, epoch, shuffle), batch_size)

    def collate(self, rows: list[list[int]], seq_len: int) -> dict[str, torch.Tensor]:
        """{chosen_ids, chosen_labels, rejected_ids, rejected_labels}, each [B, T] int64 with
        one T for both (the longest sequence of the batch); `index` [B] the pair numbers
        (to look up cached reference log-probabilities) and `num_tokens` the real tokens."""
        seqs = {w: [self.sequence(row[0], w) for row in rows] for w in ("chosen", "rejected")}
        width = max(len(ids) for w in seqs for ids, _ in seqs[w])
        out = {}
        for w, items in seqs.items():
            out[f"{w}_ids"], out[f"{w}_labels"] = _padded(items, width, self.pad_id)
        out["index"] = torch.tensor([row[0] for row in rows], dtype=torch.int64)
        out["num_tokens"] = torch.tensor(sum(len(ids) for w in seqs for ids, _ in seqs[w]))
        return out


def _one_per_row(order: np.ndarray, batch_size: int) -> list[list[list[int]]]:
    """Batches of rows that hold one example each (preference pairs, KTO completions)."""
    items = order.tolist()
    return [[[i] for i in items[k : k + batch_size]] for k in range(0, len(items), batch_size)]


def _padded(items: Sequence[tuple[np.ndarray, np.ndarray]], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, labels) [len(items), width] int64 from (ids, loss mask) sequences, right-padded."""
    ids_arr = np.full((len(items), width), pad_id, dtype=np.int64)
    lab_arr = np.full((len(items), width), IGNORE_INDEX, dtype=np.int64)
    for r, (ids, loss) in enumerate(items):
        ids_arr[r, : len(ids)] = ids
        lab_arr[r, : len(ids)] = _shifted_labels(ids, loss)
    return torch.from_numpy(ids_arr), torch.from_numpy(lab_arr)


def _tokenize_replies(chat: ChatFormat, prompt: str | list[dict[str, str]], replies: Sequence[Any], *,
                      raw_strings: bool) -> tuple[list[int], list[tuple[list[int], list[bool]]]]:
    """(prompt ids, [(reply ids, reply loss mask)]) for replies that continue one prompt.
    String form is a user turn and an assistant reply through the chat template (so
    alignment sees what SFT and chat generation see), or plain text with `raw_strings`."""
    tok = chat.tokenizer
    if isinstance(prompt, str) and raw_strings:
        encoded = [tok.encode(reply) + [tok.eos_id] for reply in replies]
        return tok.encode_prompt(prompt), [(ids, [True] * len(ids)) for ids in encoded]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
        replies = [[{"role": "assistant", "content": reply}] for reply in replies]
    prompt_ids, _ = chat.encode_conversation(prompt, add_generation_prompt=True)
    out = []
    for reply in replies:
        ids, mask = chat.encode_conversation(list(prompt) + list(reply))
        if ids[: len(prompt_ids)] != prompt_ids:
            raise DataError("the chat template tokenizes the prompt differently once a reply follows it")
        out.append((ids[len(prompt_ids) :], mask[len(prompt_ids) :]))
    return prompt_ids, out


def tokenize_preference(
    chat: ChatFormat, record: PreferenceRecord, *, raw_strings: bool = False
) -> tuple[list[int], list[int], list[bool], list[int], list[bool]]:
    """(prompt_ids, chosen_ids, chosen_mask, rejected_ids, rejected_mask) of one record."""
    prompt, ((chosen, cmask), (rejected, rmask)) = _tokenize_replies(
        chat, record.prompt, [record.chosen, record.rejected], raw_strings=raw_strings)
    return prompt, chosen, cmask, rejected, rmask


def load_preferences(
    path: str | os.PathLike[str],
    chat: ChatFormat,
    cfg: Any,
    roots: Roots | Sequence[str],
    *,
    raw_strings: bool = False,
    what: str = "finetune.train_file",
) -> PreferenceDataset:
    """Read, validate and tokenize a preference JSONL file (see the module docstring)."""

    def convert(record: Any, validate_only: bool) -> tuple | None:
        parsed = parse_preference_record(record)
        if validate_only:
            return None
        pair = tokenize_preference(chat, parsed, raw_strings=raw_strings)
        prompt, chosen, cmask, rejected, rmask = pair
        if len(prompt) + max(len(chosen), len(rejected)) > cfg.max_length:
            raise ChatTooLongError("longer than finetune.max_length")
        if not any(cmask) or not any(rmask):
            raise DataError("a response has no assistant tokens")
        return pair

    pairs, report = read_examples(path, cfg, roots, what, convert)
    return PreferenceDataset(pairs, pad_id=chat.tokenizer.pad_id, report=report)


# ---- KTO: labelled completions --------------------------------------------------------------


def kl_partners(prompts: Sequence[np.ndarray]) -> np.ndarray:
    """partner[i]: the first example after i, in file order and wrapping round, whose prompt
    differs from i's. KTO estimates its KL reference point from (prompt i, completion of
    partner[i]) - a completion that does not answer the prompt; skipping equal prompts matters
    because files made from preference pairs list a prompt's good and bad completion next to
    each other. Linear time. DataError when every prompt is the same."""
    n = len(prompts)
    keys = [bytes(np.asarray(p).tobytes()) for p in prompts]
    partner = np.full(n, -1, dtype=np.int64)
    for i in range(n - 2, -1, -1):
        partner[i] = i + 1 if keys[i + 1] != keys[i] else partner[i + 1]
    tail = partner < 0  # the run of prompts equal to the last one: wrap round to the start
    first_other = next((j for j in range(n) if keys[j] != keys[-1]), None)
    if first_other is None:
        raise DataError("every example has the same prompt; KTO's KL reference point needs at least two "
                        "different prompts (it pairs a prompt with another prompt's completion)")
    partner[tail] = first_other
    return partner


class KTODataset(_Planned):
    """Unpaired completions labelled desirable or not (KTO). Every example also carries its
    mismatched "KL" sequence: its own prompt followed by the completion of its `kl_partners`
    partner, cut so it is never longer than the longest example (it adds no seq_len needs)."""

    kind = "kto"

    def __init__(self, examples: Sequence[tuple[Sequence[int], Sequence[int], Sequence[bool], bool]], *,
                 pad_id: int, report: LoadReport | None = None):
        """examples: (prompt_ids, completion_ids, completion_mask, desirable)."""
        if not examples:
            raise DataError("no KTO examples")
        for i, (prompt, c, cm, _) in enumerate(examples):
            if not prompt or len(c) != len(cm) or not any(cm):
                raise DataError(f"example {i}: needs a prompt and a completion with at least one counted token")
        self.prompts = _Flat([e[0] for e in examples], np.int32)
        self.completions = _Flat([e[1] for e in examples], np.int32)
        self.masks = _Flat([e[2] for e in examples], np.bool_)
        self.desirable = np.fromiter((bool(e[3]) for e in examples), dtype=np.bool_, count=len(examples))
        self.pad_id = int(pad_id)
        self.report = report
        self._fingerprint: str | None = None
        try:
            self.partners = kl_partners([self.prompts[i] for i in range(len(self))])
        except DataError as exc:
            raise DataError(f"{report.path}: {exc}" if report else str(exc)) from None
        lengths = self.prompts.lengths + self.completions.lengths
        self._longest = int(lengths.max())
        self.kl_lengths = np.minimum(self.completions.lengths[self.partners], self._longest - self.prompts.lengths)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def max_length(self) -> int:
        return self._longest

    @property
    def counts(self) -> tuple[int, int]:
        """(desirable, undesirable) examples."""
        n = int(self.desirable.sum())
        return n, len(self) - n

    def _settings(self) -> str:
        return f"pad={self.pad_id}"

    def _digest_data(self, h: Any) -> None:
        for flat in (self.prompts, self.completions, self.masks):
            flat.digest(h)
        h.update(self.desirable.tobytes())

    def sequence(self, i: int, kl: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(ids, loss mask) of example i's sequence, or of its mismatched KL sequence."""
        j, n = (int(self.partners[i]), int(self.kl_lengths[i])) if kl else (i, len(self.completions[i]))
        prompt = self.prompts[i]
        ids = np.concatenate([prompt, self.completions[j][:n]])
        loss = np.concatenate([np.zeros(len(prompt), dtype=np.bool_), self.masks[j][:n]])
        return ids, loss

    def plan(self, batch_size: int, seq_len: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[list[int]]]:
        self._check_batching(batch_size, seq_len, self.max_length)
        return _one_per_row(self.order(seed, epoch, shuffle), batch_size)

    def collate(self, rows: list[list[int]], seq_len: int) -> dict[str, torch.Tensor]:
        """{ids, labels} [B, T] the examples, {kl_ids, kl_labels} [B, T'] their KL sequences,
        `desirable` [B] bool, `index` [B] the example numbers (for cached reference
        log-probabilities) and `num_tokens` the real tokens of both."""
        index = [row[0] for row in rows]
        out: dict[str, torch.Tensor] = {}
        for prefix, kl in (("", False), ("kl_", True)):
            items = [self.sequence(i, kl) for i in index]
            width = max(len(ids) for ids, _ in items)
            out[f"{prefix}ids"], out[f"{prefix}labels"] = _padded(items, width, self.pad_id)
            out["num_tokens"] = out.get("num_tokens", torch.tensor(0)) + sum(len(ids) for ids, _ in items)
        out["desirable"] = torch.from_numpy(self.desirable[index].copy())
        out["index"] = torch.tensor(index, dtype=torch.int64)
        return out


def load_kto(
    path: str | os.PathLike[str],
    chat: ChatFormat,
    cfg: Any,
    roots: Roots | Sequence[str],
    *,
    raw_strings: bool = False,
    what: str = "finetune.train_file",
) -> KTODataset:
    """Read, validate and tokenize a KTO JSONL file (labelled completions, see the module
    docstring) into a KTODataset."""

    def convert(record: Any, validate_only: bool) -> tuple | None:
        parsed = parse_kto_record(record)
        if validate_only:
            return None
        prompt, ((completion, mask),) = _tokenize_replies(chat, parsed.prompt, [parsed.completion],
                                                          raw_strings=raw_strings)
        if len(prompt) + len(completion) > cfg.max_length:
            raise ChatTooLongError("longer than finetune.max_length")
        if not any(mask):
            raise DataError("the completion has no assistant tokens")
        return prompt, completion, mask, parsed.desirable

    examples, report = read_examples(path, cfg, roots, what, convert)
    return KTODataset(examples, pad_id=chat.tokenizer.pad_id, report=report)
