"""`classify` and `regress`: sequence-level objectives on labelled texts (data format:
bastion/data/labelled.py). The model is finetune.init_from with a score head of K outputs in
place of its lm head, read at each text's last non-padding token (bastion/model/heads.py:
exactly transformers' `...ForSequenceClassification`, so `bastion export hf` scores alike).

    classify   K = len(finetune.sequence.labels); loss = cross-entropy of the K scores
               (transformers' single_label_classification loss)
    regress    K = 1; loss = finetune.sequence.regress_loss of the score and the label:
               mse (default: transformers' "regression" loss, so an exported model's own loss
               is the one it was trained with), l1 (what most CMU-MOSI papers train with) or
               huber (finetune.sequence.huber_delta)

Starting from a language model the lm head is dropped and a zero score head added (every
class starts equally likely and every value at 0; nothing drawn from the RNG); starting from
a checkpoint of the same objective and K continues it. Validation reports the loss and the
field's metrics (bastion/train/label_metrics.py) over the whole val file (up to
train.eval_batches batches); under torchrun each rank scores its rows and one all-reduce
assembles the table, so the metrics are those of one process.
With finetune.lora.enabled the adapters train and the score head trains whole beside them
(bastion/model/lora.py SAVED_WHOLE, PEFT's modules_to_save idea); checkpoints and the adapter
folder carry both, pinned to the language-model base (docs/multimodal.md).
With finetune.sequence.modalities the model also fuses per-example feature streams
(model/fusion.py; data: bastion/data/features.py): a text start point gains a seeded fusion,
modality dropout is finetune.sequence.modality_dropout, and the whole model trains (no LoRA).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from bastion.config.schema import BastionConfig
from bastion.data.batches import batch_to_device
from bastion.data.labelled import LabelledDataset, LabelSpec, label_spec, load_labelled
from bastion.errors import CheckpointError, ConfigError, DataError
from bastion.model.fusion import batch_streams, initial_weights
from bastion.model.heads import sequence_scores
from bastion.train.distributed import sum_across_ranks
from bastion.train.label_metrics import classification_metrics, regression_metrics
from bastion.train.tasks.base import Autocast, Forward, Stats, register_task, start_with_score_head
from bastion.train.tasks.files import FileTask, eval_batches

if TYPE_CHECKING:
    from bastion.train.checkpoints import StartPoint


def head_size(cfg: BastionConfig) -> int:
    """Score-head outputs of the run's objective: K classes, or 1 value."""
    labels = cfg.finetune.sequence.labels
    return len(labels) if cfg.train.objective == "classify" and labels else 1


def label_loss(scores: torch.Tensor, labels: torch.Tensor, spec: LabelSpec, regress_loss: str = "mse",
               huber_delta: float = 1.0) -> torch.Tensor:
    """Mean loss of [B, K] float32 scores against [B] labels (class indices or values)."""
    if spec.kind == "classify":
        return F.cross_entropy(scores, labels)
    values, targets = scores[:, 0], labels.float()
    if regress_loss == "l1":
        return F.l1_loss(values, targets)
    if regress_loss == "huber":
        return F.huber_loss(values, targets, delta=huber_delta)
    return F.mse_loss(values, targets)


def label_metrics(scores: np.ndarray, labels: np.ndarray, spec: LabelSpec) -> dict[str, float]:
    """The field's metrics of [N, K] scores against [N] labels."""
    if spec.kind == "classify":
        return classification_metrics(scores, labels)
    return regression_metrics(scores[:, 0], labels)


@torch.no_grad()
def score_dataset(forward: Forward, dataset: LabelledDataset, *, batch_size: int, seq_len: int, device: torch.device,
                  autocast: Autocast, max_batches: int | None = None, rank: int = 0,
                  world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, K] float32 scores of the first max_batches batches in file order, [N] bool: which
    rows were scored), on `device`; each rank scores its rows, one all-reduce joins them."""
    pad_id, names = dataset.pad_id, sorted(dataset.streams)
    table: torch.Tensor | None = None
    seen = torch.zeros(len(dataset), dtype=torch.float32, device=device)
    for batch, real in eval_batches(dataset, batch_size, seq_len, max_batches, rank, world, device):
        with autocast():
            scores = sequence_scores(forward, batch["input_ids"], pad_id, batch_streams(batch, names)).float()
        if table is None:
            table = torch.zeros(len(dataset), scores.size(1), dtype=torch.float32, device=device)
        if real:
            table[batch["index"]] = scores
            seen[batch["index"]] = 1.0
    if table is None:
        raise DataError("no labelled examples to score")
    joined = sum_across_ranks(torch.cat([table, seen[:, None]], dim=1), world)
    return joined[:, :-1], joined[:, -1] > 0


def evaluate_labels(forward: Forward, dataset: LabelledDataset, *, batch_size: int, seq_len: int,
                    device: torch.device, autocast: Autocast, max_batches: int | None = None, rank: int = 0,
                    world: int = 1, regress_loss: str = "mse", huber_delta: float = 1.0) -> dict[str, float]:
    """Loss and the field's metrics over (the first max_batches batches of) labelled data."""
    assert dataset.labels is not None, "evaluation needs labels"
    scores, seen = score_dataset(forward, dataset, batch_size=batch_size, seq_len=seq_len, device=device,
                                 autocast=autocast, max_batches=max_batches, rank=rank, world=world)
    scores = scores[seen].cpu()
    labels = torch.from_numpy(dataset.labels)[seen.cpu()]
    loss = label_loss(scores, labels, dataset.spec, regress_loss, huber_delta).item()
    return {"loss": loss, **label_metrics(scores.numpy(), labels.numpy(), dataset.spec), "examples": float(len(labels))}


def _shown(modalities: Any) -> str:
    return ", ".join(f"{n} ({m.features} x {m.max_frames})" for n, m in sorted(modalities.items())) or "none"


def start_with_fusion(start: StartPoint, cfg: BastionConfig) -> None:
    """The start point of a run with finetune.sequence.modalities: a text scoring model gains
    a new fusion (model/fusion.py, seeded by train.seed); a fused one must declare the same
    streams (CheckpointError naming both otherwise). Without modalities, a fused start is
    refused: training it as text only would silently drop what it learnt to read."""
    wanted, has = cfg.finetune.sequence.modalities, start.model_cfg.modalities
    if not wanted and not has:
        return
    if has:
        if has != wanted:
            raise CheckpointError(f"finetune.init_from {start.directory} fuses modalities {_shown(has)}; "
                                  f"finetune.sequence.modalities declares {_shown(wanted)}: they must be the same")
        return
    assert start.weights is not None, "fine-tuning starts from weights"
    model_cfg = start.model_cfg.model_copy(update={"modalities": dict(wanted)})
    start.weights = {**start.weights, **initial_weights(wanted, model_cfg.d_model, model_cfg.n_head, cfg.train.seed)}
    start.model_cfg = model_cfg


@register_task
class ClassifyTask(FileTask):
    objective = "classify"

    def __init__(self, cfg: BastionConfig, start: StartPoint, *, rank: int = 0, world: int = 1):
        self.spec = label_spec(self.objective, cfg.finetune.sequence)
        self.modalities = sorted(cfg.finetune.sequence.modalities)
        if self.modalities and cfg.finetune.lora.enabled:
            raise ConfigError("finetune.lora.enabled: a model with finetune.sequence.modalities trains whole (LoRA "
                              "adapters do not carry the fusion weights); turn LoRA off",
                              [("finetune.lora.enabled", "not supported with finetune.sequence.modalities")])
        super().__init__(cfg, start, rank=rank, world=world)
        self.pad_id = self.train.pad_id

    def load(self, path: Any, chat: Any, ft: Any, roots: Any, *, what: str = "finetune.train_file") -> LabelledDataset:
        return load_labelled(path, chat.tokenizer, self.spec, ft, roots, what=what, modalities=ft.sequence.modalities)

    @classmethod
    def adapt_start(cls, start: StartPoint, cfg: BastionConfig | None = None) -> None:
        assert cfg is not None, "the head's size comes from the config"
        size = head_size(cfg)
        start_with_score_head(start, size, f"train.objective {cls.objective} here needs {size}")
        start_with_fusion(start, cfg)

    def prepare(self, model: torch.nn.Module, device: torch.device, autocast: Autocast) -> None:
        if self.modalities:
            model.fusion.modality_dropout = self.cfg.finetune.sequence.modality_dropout

    def describe(self) -> list[str]:
        notes = [f"train: {self.train.describe()}"]
        if self.val is not None:
            notes.append(f"val: {self.val.describe()}")
        return notes

    def batch_unit(self) -> str:
        return f"texts of up to {self.seq_len} tokens"

    def micro_batch_loss(self, forward: Forward, device: torch.device) -> tuple[torch.Tensor, int, Stats]:
        full, mine, real = self._next_rows()
        batch = batch_to_device(mine, device)
        scores = sequence_scores(forward, batch["input_ids"], self.pad_id, batch_streams(batch, self.modalities)).float()
        sc = self.cfg.finetune.sequence
        loss = label_loss(scores, batch["labels"], self.spec, sc.regress_loss, sc.huber_delta)
        stats = self._batch_stats(scores.detach(), batch["labels"])
        if self.world > 1:  # this rank's share of the global batch's texts
            share = (len(mine["index"]) if real else 0) * self.world / len(full["index"])
            loss, stats = loss * share, {name: value * share for name, value in stats.items()}
        return loss, int(full["num_tokens"]), stats

    def _batch_stats(self, scores: torch.Tensor, labels: torch.Tensor) -> Stats:
        return {"accuracy": (scores.argmax(-1) == labels).float().mean()}

    def evaluate(self, forward: Forward, autocast: Autocast, device: torch.device, max_batches: int) -> dict[str, float]:
        assert self.val is not None
        sc = self.cfg.finetune.sequence
        return evaluate_labels(forward, self.val, batch_size=self.batch_size, seq_len=self.seq_len, device=device,
                               autocast=autocast, max_batches=max_batches, rank=self.rank, world=self.world,
                               regress_loss=sc.regress_loss, huber_delta=sc.huber_delta)

    def summary(self, metrics: dict[str, float]) -> str:
        if "accuracy" not in metrics:
            return ""
        return f", accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}"


@register_task
class RegressTask(ClassifyTask):
    objective = "regress"

    def _batch_stats(self, scores: torch.Tensor, labels: torch.Tensor) -> Stats:
        return {"mae": (scores[:, 0] - labels).abs().mean()}

    def summary(self, metrics: dict[str, float]) -> str:
        if "mae" not in metrics:
            return ""
        return (f", MAE {metrics['mae']:.3f}, Pearson {metrics['pearson']:.3f}, Acc-2 {metrics['acc2_nonzero']:.3f} "
                f"(non-zero), Acc-7 {metrics['acc7']:.3f}")
