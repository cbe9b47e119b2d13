"""Classifiers and regressors (train.objective classify | regress) on new data:

  * `eval_labels`     labelled JSONL -> loss and the field's metrics (accuracy, macro-F1;
                      MAE, Pearson r, Acc-2 both ways, Acc-7: bastion/train/label_metrics.py)
  * `predict_labels`  texts (a JSONL file or strings) -> per example the class and every
                      class's probability, or the value

The checkpoint's own config says which task it is, the class names and the longest text
(finetune.max_length; longer texts keep their first tokens, as in training). Files are read
by the labelled-text reader (bastion/data/labelled.py): confined to `roots`, size-bounded,
every bad line reported as file:line.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from bastion.data.labelled import LabelledDataset, LabelSpec, label_spec, load_labelled, parse_labelled_record
from bastion.errors import CheckpointError, DataError
from bastion.infer.loading import LoadedModel, load_for_inference
from bastion.train.tasks.classify import evaluate_labels, score_dataset

OBJECTIVES = ("classify", "regress")
MAX_TEXTS = 1024  # --text strings on one command line


def load_labeller(checkpoint: str | Path, device: str = "cpu") -> tuple[LoadedModel, LabelSpec]:
    """The verified scoring model of a classify / regress checkpoint and its LabelSpec."""
    loaded = load_for_inference(checkpoint, device=device, head="score")
    objective = loaded.config.train.objective
    if objective not in OBJECTIVES:
        raise CheckpointError(f"{loaded.directory} was trained with train.objective {objective}, not classify or "
                              "regress: it has no class names or values to report")
    return loaded, label_spec(objective, loaded.config.finetune.sequence)


def _length(loaded: LoadedModel) -> int:
    return min(loaded.config.finetune.max_length, loaded.config.model.max_seq_len)


def eval_labels(checkpoint: str | Path, file: str | Path, *, roots: Sequence[str] = (".",), batch_size: int = 8,
                device: str = "cpu") -> dict[str, float]:
    """Loss and metrics of a classify / regress checkpoint on a labelled JSONL file."""
    loaded, spec = load_labeller(checkpoint, device)
    length = _length(loaded)
    cfg = loaded.config.finetune.model_copy(update={"max_length": length})
    data = load_labelled(file, loaded.tokenizer, spec, cfg, roots, what="--file")
    sc = loaded.config.finetune.sequence
    out = evaluate_labels(loaded.model, data, batch_size=batch_size, seq_len=length, device=torch.device(device),
                          autocast=contextlib.nullcontext, regress_loss=sc.regress_loss, huber_delta=sc.huber_delta)
    return out | {"truncated": float(data.truncated)}


def predict_labels(checkpoint: str | Path, *, file: str | Path | None = None, texts: Sequence[str] = (),
                   roots: Sequence[str] = (".",), batch_size: int = 8, device: str = "cpu") -> Iterator[dict[str, Any]]:
    """One dict per example, in input order: {"label", "probabilities": {name: p}} for a
    classifier, {"value"} for a regressor. Everything is read and checked before the first
    prediction, so a bad line yields nothing."""
    if (file is None) == (not texts):
        raise DataError("give a JSONL file (--file) or texts (--text), not both")
    if len(texts) > MAX_TEXTS:
        raise DataError(f"at most {MAX_TEXTS} --text values; put more in a JSONL file")
    loaded, spec = load_labeller(checkpoint, device)
    length = _length(loaded)
    data = _inputs(loaded, length, file, texts, roots)
    scores, _ = score_dataset(loaded.model, data, batch_size=batch_size, seq_len=length, device=torch.device(device),
                              autocast=contextlib.nullcontext)
    scores = scores.cpu()
    if spec.kind == "regress":
        for value in scores[:, 0].tolist():
            yield {"value": value}
        return
    for row in scores.softmax(-1).tolist():
        best = max(range(len(row)), key=row.__getitem__)
        yield {"label": spec.names[best], "probabilities": dict(zip(spec.names, row))}


def _inputs(loaded: LoadedModel, length: int, file: str | Path | None, texts: Sequence[str],
            roots: Sequence[str]) -> LabelledDataset:
    predict = LabelSpec("predict")
    tokenizer = loaded.tokenizer
    if file is not None:
        cfg = loaded.config.finetune.model_copy(update={"max_length": length})
        return load_labelled(file, tokenizer, predict, cfg, roots, what="--file")
    ids = []
    for i, text in enumerate(texts, start=1):
        try:
            parse_labelled_record({"text": text}, predict)
        except DataError as exc:
            raise DataError(f"--text #{i}: {exc}") from None
        encoded = tokenizer.encode_prompt(text)
        if tokenizer.pad_id in encoded:
            raise DataError(f"--text #{i}: 'text' contains the tokenizer's pad token")
        ids.append(encoded[:length])
    return LabelledDataset(ids, None, spec=predict, pad_id=tokenizer.pad_id)


__all__ = ["eval_labels", "load_labeller", "predict_labels"]
