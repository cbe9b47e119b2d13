"""Classifiers and regressors (train.objective classify | regress) on new data:

  * `eval_labels`     labelled JSONL -> loss and the field's metrics (accuracy, macro-F1;
                      MAE, Pearson r, Acc-2 both ways, Acc-7: bastion/train/label_metrics.py)
  * `predict_labels`  texts (a JSONL file or strings) -> per example the class and every
                      class's probability, or the value

The checkpoint's own config says which task it is, the class names and the longest text
(finetune.max_length; longer texts keep their first tokens, as in training). Files are read
by the labelled-text reader (bastion/data/labelled.py): confined to `roots`, size-bounded,
every bad line reported as file:line. A fused model (model.modalities, bastion/model/fusion.py)
also reads each modality's feature file beside the JSONL (bastion/data/features.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator, Sequence
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
                device: str = "cpu", without: Collection[str] = ()) -> dict[str, float]:
    """Loss and metrics of a classify / regress checkpoint on a labelled JSONL file. A fused
    model reads the file's feature streams (<file stem>.<modality>.safetensors); a modality
    in `without` is left out for every example (an ablation: what the model loses without it)."""
    loaded, spec = load_labeller(checkpoint, device)
    length = _length(loaded)
    cfg = loaded.config.finetune.model_copy(update={"max_length": length})
    data = load_labelled(file, loaded.tokenizer, spec, cfg, roots, what="--file",
                         modalities=loaded.config.model.modalities, without=without)
    sc = loaded.config.finetune.sequence
    out = evaluate_labels(loaded.model, data, batch_size=batch_size, seq_len=length, device=torch.device(device),
                          autocast=contextlib.nullcontext, regress_loss=sc.regress_loss, huber_delta=sc.huber_delta)
    return out | {"truncated": float(data.truncated)}


def predict_labels(checkpoint: str | Path, *, file: str | Path | None = None, texts: Sequence[str] = (),
                   roots: Sequence[str] = (".",), batch_size: int = 8, device: str = "cpu",
                   without: Collection[str] = ()) -> Iterator[dict[str, Any]]:
    """One dict per example, in input order: {"label", "probabilities": {name: p}} for a
    classifier, {"value"} for a regressor, with the record's "id" first when it has one.
    Everything is read and checked before the first prediction, so a bad line yields
    nothing. A fused model reads the file's feature streams; `texts` have none (every
    modality missing, as for an example the feature files do not name)."""
    if (file is None) == (not texts):
        raise DataError("give a JSONL file (--file) or texts (--text), not both")
    if len(texts) > MAX_TEXTS:
        raise DataError(f"at most {MAX_TEXTS} --text values; put more in a JSONL file")
    loaded, spec = load_labeller(checkpoint, device)
    length = _length(loaded)
    data = _inputs(loaded, length, file, texts, roots, without)
    scores, _ = score_dataset(loaded.model, data, batch_size=batch_size, seq_len=length, device=torch.device(device),
                              autocast=contextlib.nullcontext)
    scores = scores.cpu()
    ids = data.example_ids or [None] * len(data)
    if spec.kind == "regress":
        for example_id, value in zip(ids, scores[:, 0].tolist()):
            yield _with_id(example_id, {"value": value})
        return
    for example_id, row in zip(ids, scores.softmax(-1).tolist()):
        best = max(range(len(row)), key=row.__getitem__)
        yield _with_id(example_id, {"label": spec.names[best], "probabilities": dict(zip(spec.names, row))})


def _with_id(example_id: str | None, prediction: dict[str, Any]) -> dict[str, Any]:
    return prediction if example_id is None else {"id": example_id, **prediction}


def _inputs(loaded: LoadedModel, length: int, file: str | Path | None, texts: Sequence[str],
            roots: Sequence[str], without: Collection[str]) -> LabelledDataset:
    predict = LabelSpec("predict")
    tokenizer = loaded.tokenizer
    modalities = loaded.config.model.modalities
    if file is not None:
        cfg = loaded.config.finetune.model_copy(update={"max_length": length})
        return load_labelled(file, tokenizer, predict, cfg, roots, what="--file", modalities=modalities,
                             without=without)
    unknown = sorted(set(without) - set(modalities))
    if unknown:
        raise DataError(f"cannot leave out {', '.join(unknown)}: not a modality of this model")
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
    streams = {name: (spec.features, [None] * len(ids)) for name, spec in modalities.items()}
    return LabelledDataset(ids, None, spec=predict, pad_id=tokenizer.pad_id, streams=streams)


__all__ = ["eval_labels", "load_labeller", "predict_labels"]
