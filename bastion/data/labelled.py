"""Labelled texts for sequence-level objectives (train.objective classify | regress), `bastion
eval classify` and `bastion predict`: one JSON object per line,

    classify:  {"text": "...", "label": "pos"}     a name from finetune.sequence.labels,
               {"text": "...", "label": 2}         or its index (0-based, in that order)
    regress:   {"text": "...", "label": -1.4}      a finite number, inside label_range if set
    predict:   {"text": "..."}                     ("label" optional: ignored)

    with feature streams (finetune.sequence.modalities): {"id": "clip_0001", "text": ..., ...}
               every record has a unique "id"; its frames are the tensors of that name in
               <split>.<modality>.safetensors beside the file (bastion/data/features.py)

Read through the fine-tuning reader (bastion/data/finetune.py: confined, size-bounded,
streamed, every bad line reported as file:line naming the field). Any other key is an error,
so a record never silently trains on less than it says. "id" is optional without modalities.

A text becomes `tokenizer.encode_prompt(text)` (bos first when the tokenizer adds one, as
transformers' `tokenizer(text)` does); one longer than finetune.max_length tokens keeps its
first max_length tokens (transformers' truncation=True) and is counted. A batch is one text
per row, right-padded with the pad id: the score head reads each row's last non-pad token.
"""
from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from bastion.data.features import STREAM_KEY, check_example_id, pad_frames, read_split_features
from bastion.data.finetune import LoadReport, _Flat, _one_per_row, _Planned, read_examples
from bastion.errors import DataError
from bastion.safepath import Roots

Kind = Literal["classify", "regress", "predict"]
RECORD_KEYS = {"id", "text", "label"}
Stream = tuple[int, Sequence["torch.Tensor | None"]]  # (features per frame, per example its frames or None)
MAX_ABS_VALUE = 1e9  # regress labels: far beyond any real scale, well inside float32 (MSE of 1e9 is 1e18)


@dataclass(frozen=True)
class LabelSpec:
    """What a record's label must be: one of `names` (classify), a number inside `bounds`
    (regress), or anything / nothing (predict: the label is not read)."""

    kind: Kind
    names: tuple[str, ...] = ()
    bounds: tuple[float, float] | None = None

    def check(self, record: dict[str, Any]) -> int | float | None:
        if self.kind == "predict":
            return None
        if "label" not in record:
            raise DataError("missing field 'label'")
        label = record["label"]
        return self._class_index(label) if self.kind == "classify" else self._value(label)

    def _class_index(self, label: Any) -> int:
        if isinstance(label, str):
            if label not in self.names:
                raise DataError(f"'label' {_shown(label)} is not one of finetune.sequence.labels "
                                f"({', '.join(self.names[:8])}{', ...' if len(self.names) > 8 else ''})")
            return self.names.index(label)
        if isinstance(label, int) and not isinstance(label, bool):
            if not 0 <= label < len(self.names):
                raise DataError(f"'label' index {label} is outside 0..{len(self.names) - 1}")
            return label
        raise DataError(f"'label' must be a class name (string) or its index (integer), got {type(label).__name__}")

    def _value(self, label: Any) -> float:
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            raise DataError(f"'label' must be a number, got {type(label).__name__}")
        try:
            value = float(label)
        except OverflowError:  # an integer beyond float range
            value = math.inf
        if not math.isfinite(value):
            raise DataError("'label' must be a finite number")
        if abs(value) > MAX_ABS_VALUE:
            raise DataError(f"'label' {value:g} is beyond +-{MAX_ABS_VALUE:g}")
        if self.bounds is not None and not self.bounds[0] <= value <= self.bounds[1]:
            raise DataError(f"'label' {value:g} is outside finetune.sequence.label_range "
                            f"[{self.bounds[0]:g}, {self.bounds[1]:g}]")
        return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_labelled_record(record: Any, spec: LabelSpec) -> tuple[str, int | float | None]:
    """(text, label) of one record, or a DataError naming the field that is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"record must be a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - RECORD_KEYS)
    if unknown:
        raise DataError(f"unknown field(s) {', '.join(_shown(k) for k in unknown[:5])}; a record holds 'id', 'text' "
                        "and 'label' only")
    if "text" not in record:
        raise DataError("missing field 'text'")
    text = record["text"]
    if not isinstance(text, str):
        raise DataError(f"'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise DataError("'text' is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError("'text' is not valid Unicode (lone surrogate)") from None
    if "id" in record:
        check_example_id(record["id"])
    return text, spec.check(record)


class LabelledDataset(_Planned):
    """Tokenized texts, one per row, with a class index (int64) or a value (float32) each."""

    kind = "labelled"

    def __init__(self, texts: Sequence[Sequence[int]], labels: Sequence[int | float] | None, *, spec: LabelSpec,
                 pad_id: int, report: LoadReport | None = None, truncated: int = 0,
                 streams: Mapping[str, Stream] | None = None):
        """`streams`: {modality: (features per frame, per example its [frames, features]
        float32 tensor or None where the example lacks the modality)}."""
        if not texts:
            raise DataError("no labelled examples")
        self.tokens = _Flat(texts, np.int32)
        self.spec, self.pad_id, self.report, self.truncated = spec, int(pad_id), report, truncated
        dtype = np.int64 if spec.kind == "classify" else np.float32
        self.labels = None if labels is None else np.asarray(labels, dtype=dtype)
        self.streams = dict(streams or {})
        self.example_ids: list[str | None] | None = None  # the records' "id"s, when read from a file
        assert all(len(frames) == len(texts) for _, frames in self.streams.values()), "one entry per example"
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def max_length(self) -> int:
        return int(self.tokens.lengths.max())

    def _settings(self) -> str:
        streams = ",".join(f"{name}:{size}" for name, (size, _) in sorted(self.streams.items()))
        return f"{self.spec.kind},labels={','.join(self.spec.names)},pad={self.pad_id},streams={streams}"

    def _digest_data(self, h: Any) -> None:
        self.tokens.digest(h)
        if self.labels is not None:
            h.update(self.labels.tobytes())
        for name, (_, frames) in sorted(self.streams.items()):  # resuming on other features is other data
            h.update(name.encode())
            for x in frames:
                h.update(b"-" if x is None else np.ascontiguousarray(x.numpy()).tobytes() + str(len(x)).encode())

    def plan(self, batch_size: int, seq_len: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[list[int]]]:
        self._check_batching(batch_size, seq_len, self.max_length)
        return _one_per_row(self.order(seed, epoch, shuffle), batch_size)

    def collate(self, rows: list[list[int]], seq_len: int) -> dict[str, torch.Tensor]:
        """{input_ids [B, T] right-padded to the batch's longest, index [B], num_tokens,
        labels [B] (int64 class indices or float32 values) when the data has them, and per
        modality `streams.<name>.frames` [B, F, features] / `.frame_mask` [B, F] /
        `.present` [B] (bastion/data/features.py pad_frames)}."""
        index = [row[0] for row in rows]
        width = max(int(self.tokens.lengths[i]) for i in index)
        ids = np.full((len(index), width), self.pad_id, dtype=np.int64)
        for r, i in enumerate(index):
            ids[r, : self.tokens.lengths[i]] = self.tokens[i]
        out = {"input_ids": torch.from_numpy(ids), "index": torch.tensor(index, dtype=torch.int64),
               "num_tokens": torch.tensor(int(self.tokens.lengths[index].sum()))}
        if self.labels is not None:
            out["labels"] = torch.from_numpy(self.labels[index].copy())
        for name, (size, frames) in self.streams.items():
            out |= pad_frames([frames[i] for i in index], size, prefix=f"{STREAM_KEY}.{name}.")
        return out

    def describe(self) -> str:
        text = self.report.describe() if self.report else f"{len(self)} examples"
        return text + (f", {self.truncated} cut to finetune.max_length" if self.truncated else "")


def load_labelled(path: str | os.PathLike[str], tokenizer: Any, spec: LabelSpec, cfg: Any,
                  roots: Roots | Sequence[str], *, what: str = "finetune.train_file",
                  modalities: Mapping[str, Any] | None = None, without: Collection[str] = ()) -> LabelledDataset:
    """Read, validate and tokenize a labelled-text JSONL file. `cfg` is a FinetuneConfig
    (max_length, max_examples, max_file_bytes, sequence.max_feature_file_bytes); `roots` is
    data.allowed_roots. With `modalities` (finetune.sequence.modalities) every record needs a
    unique "id" and each modality's feature file is read and checked (bastion/data/features.py);
    a modality in `without` is not read and is missing for every example (an ablation)."""
    truncated = 0
    modalities = dict(modalities or {})
    unknown = sorted(set(without) - set(modalities))
    if unknown:
        raise DataError(f"cannot leave out {', '.join(unknown)}: not a modality of this model "
                        f"({', '.join(sorted(modalities)) or 'text only'})")
    seen_ids: set[str] = set()

    def convert(record: Any, validate_only: bool) -> tuple[list[int], int | float | None, str | None] | None:
        nonlocal truncated
        text, label = parse_labelled_record(record, spec)
        example_id = record.get("id")
        if modalities:
            if example_id is None:
                raise DataError("missing field 'id' (finetune.sequence.modalities are declared: an example's "
                                "frames are found by its id)")
            if example_id in seen_ids:
                raise DataError(f"'id' {_shown(example_id)} is used by an earlier record; ids must be unique")
            seen_ids.add(example_id)
        if validate_only:
            return None
        ids = tokenizer.encode_prompt(text)
        if tokenizer.pad_id in ids:  # pooling reads the last non-pad token: a pad inside would move it
            raise DataError("'text' contains the tokenizer's pad token")
        if len(ids) > cfg.max_length:
            ids, truncated = ids[: cfg.max_length], truncated + 1
        return ids, label, example_id

    examples, report = read_examples(path, cfg, roots, what, convert)
    labels = None if spec.kind == "predict" else [label for _, label, _ in examples]
    read = {name: spec_ for name, spec_ in modalities.items() if name not in without}
    example_ids = [example_id for _, _, example_id in examples]
    # Reading stopped at max_examples: later records' ids are unknown, so a tensor naming
    # none of the kept ids cannot be called misspelt.
    known = None if report.truncated else set(example_ids)
    features = read_split_features(path, read, roots, max_bytes=cfg.sequence.max_feature_file_bytes, ids=known)
    streams = {name: (spec_.features, [features[name].get(i) if name in features else None for i in example_ids])
               for name, spec_ in modalities.items()}
    data = LabelledDataset([ids for ids, _, _ in examples], labels, spec=spec, pad_id=tokenizer.pad_id, report=report,
                           truncated=truncated, streams=streams)
    data.example_ids = example_ids
    return data


def label_spec(objective: str, sequence_cfg: Any) -> LabelSpec:
    """The LabelSpec of train.objective classify or regress from finetune.sequence."""
    if objective == "classify":
        return LabelSpec("classify", names=tuple(sequence_cfg.labels or ()))
    return LabelSpec("regress", bounds=sequence_cfg.label_range)


__all__ = ["LabelSpec", "LabelledDataset", "label_spec", "load_labelled", "parse_labelled_record"]
