"""Fine-tuning data: chat JSONL for SFT, preference JSONL for DPO/SimPO.

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

Conversation rules: an optional system message first, then user; a user message is
followed by an assistant one; an assistant message by a user or tool message; a tool
message by a tool or assistant one. Contents are non-empty strings. An SFT conversation
ends with an assistant message; a preference prompt ends with a user (or tool) message and
its chosen/rejected continuations start with an assistant message. chosen != rejected.
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

Order and resume. `plan(batch_size, seq_len, seed, epoch)` is a pure function of its
arguments and the data; `BatchCursor` (bastion/data/batches.py) walks plans epoch after epoch, and its state
(epoch, position, plus a fingerprint of the data and settings) restores it exactly.
"""
from __future__ import annotations

import hashlib
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
    return check_conversation(record["messages"], ends_with=("assistant",))


@dataclass(frozen=True)
class PreferenceRecord:
    """A validated pair: chat form (message lists) or string form (`prompt` etc. are str)."""

    prompt: str | list[dict[str, str]]
    chosen: str | list[dict[str, str]]
    rejected: str | list[dict[str, str]]

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


def parse_preference_record(record: Any) -> PreferenceRecord:
    if not isinstance(record, dict):
        raise DataError(f"record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise DataError(f"missing field(s) {', '.join(map(repr, missing))}")
    prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    if all(isinstance(v, str) for v in (prompt, chosen, rejected)):
        for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
            if not value.strip():
                raise DataError(f"'{name}' is empty")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"'{name}' is not valid Unicode (lone surrogate)") from None
        if chosen == rejected:
            raise DataError("'chosen' and 'rejected' are identical")
        return PreferenceRecord(prompt, chosen, rejected)
    if all(isinstance(v, list) for v in (prompt, chosen, rejected)):
        try:
            p = check_conversation(prompt, ends_with=("user", "tool"))
        except DataError as exc:
            raise DataError(f"'prompt': {exc}") from None
        responses = []
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            try:
                responses.append(check_conversation(value, ends_with=("assistant",), starts_after=p[-1]["role"]))
            except DataError as exc:
                raise DataError(f"'{name}': {exc}") from None
            if responses[-1][0]["role"] != "assistant":
                raise DataError(f"'{name}' must start with an assistant message")
        if responses[0] == responses[1]:
            raise DataError("'chosen' and 'rejected' are identical")
        return PreferenceRecord(p, responses[0], responses[1])
    kinds = ", ".join(f"{k}: {type(record[k]).__name__}" for k in ("prompt", "chosen", "rejected"))
    raise DataError(f"'prompt', 'chosen' and 'rejected' must all be strings or all be message lists ({kinds})")


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


def _read_examples(path: str | os.PathLike[str], cfg: Any, roots: Roots | Sequence[str], what: str,
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

    examples, report = _read_examples(path, cfg, roots, what, convert)
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
        order = self.order(seed, epoch, shuffle).tolist()
        return [[[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]

    def collate(self, rows: list[list[int]], seq_len: int) -> dict[str, torch.Tensor]:
        """{chosen_ids, chosen_labels, rejected_ids, rejected_labels}, each [B, T] int64 with
        one T for both (the longest sequence of the batch); `index` [B] the pair numbers
        (to look up cached reference log-probabilities) and `num_tokens` the real tokens."""
        seqs = {w: [self.sequence(row[0], w) for row in rows] for w in ("chosen", "rejected")}
        width = max(len(ids) for w in seqs for ids, _ in seqs[w])
        out = {}
        for w, items in seqs.items():
            ids_arr = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            lab_arr = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
            for r, (ids, loss) in enumerate(items):
                ids_arr[r, : len(ids)] = ids
                lab_arr[r, : len(ids)] = _shifted_labels(ids, loss)
            out[f"{w}_ids"] = torch.from_numpy(ids_arr)
            out[f"{w}_labels"] = torch.from_numpy(lab_arr)
        out["index"] = torch.tensor([row[0] for row in rows], dtype=torch.int64)
        out["num_tokens"] = torch.tensor(sum(len(ids) for w in seqs for ids, _ in seqs[w]))
        return out


def tokenize_preference(
    chat: ChatFormat, record: PreferenceRecord, *, raw_strings: bool = False
) -> tuple[list[int], list[int], list[bool], list[int], list[bool]]:
    """(prompt_ids, chosen_ids, chosen_mask, rejected_ids, rejected_mask) of one record."""
    tok = chat.tokenizer
    if not record.is_chat and raw_strings:
        prompt = tok.encode_prompt(record.prompt)
        chosen = tok.encode(record.chosen) + [tok.eos_id]
        rejected = tok.encode(record.rejected) + [tok.eos_id]
        return prompt, chosen, [True] * len(chosen), rejected, [True] * len(rejected)
    if record.is_chat:
        prompt_msgs, chosen_msgs, rejected_msgs = record.prompt, record.chosen, record.rejected
    else:
        prompt_msgs = [{"role": "user", "content": record.prompt}]
        chosen_msgs = [{"role": "assistant", "content": record.chosen}]
        rejected_msgs = [{"role": "assistant", "content": record.rejected}]
    prompt, _ = chat.encode_conversation(prompt_msgs, add_generation_prompt=True)
    out: list[Any] = [prompt]
    for response in (chosen_msgs, rejected_msgs):
        ids, mask = chat.encode_conversation(list(prompt_msgs) + list(response))
        if ids[: len(prompt)] != prompt:
            raise DataError("the chat template tokenizes the prompt differently once a reply follows it")
        out += [ids[len(prompt) :], mask[len(prompt) :]]
    return tuple(out)  # type: ignore[return-value]


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

    pairs, report = _read_examples(path, cfg, roots, what, convert)
    return PreferenceDataset(pairs, pad_id=chat.tokenizer.pad_id, report=report)
