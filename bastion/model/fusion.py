"""Gated cross-modal fusion: text states attend to each modality's frames, learned gates mix
what they find back into the text (the adaptive-fusion idea), in one file beside the
transformer (issue 17, part 2; docs/multimodal.md).

    text ids -> transformer trunk -> final norm -> h [B, T, D]             (what `score` reads)
    per modality m:  frames [B, F_m, features_m] -> LayerNorm -> Linear -> + frame position
                     a_m = cross-attention(queries h, keys/values the frames, padding masked)
    gates:           g_m = sigmoid(W_m [h; a_1; ...; a_M])                  [B, T, D] each
    fused:           h + sum_m present_m * g_m * a_m  -> score at the last non-pad token

Why each piece:
  * LayerNorm on the raw features: real streams come on any scale (COVAREP's raw values,
    CLIP's unit vectors); the projection then learns from comparable inputs.
  * Cross-attention with text queries: each text position picks the frames it needs, so
    frames need no alignment to tokens (MOSI's word-aligned features are one special case).
  * Each gate sees the text state and every modality's attended vector: one stream can open
    or close another's contribution, which is what lets the fused model learn an interaction
    (the label an XOR of audio and visual evidence). With a gate of h and a_m only, the
    score would be a sum of per-modality terms and no such label is learnable.
  * A residual mix: with every gate shut the model is the text model unchanged.
  * A missing modality (no frames for that example, or dropped by modality dropout while
    training) contributes exactly zero (torch.where, not a multiplication that 0 * NaN
    would poison), and its attended vector is zero where other gates read it.

Where it lives: `Transformer` (model/transformer.py) holds it as `fusion` when
`model.modalities` names streams, as it holds `score` when `model.score_labels` is set, and
runs it between the final norm and the score head when `forward(ids, streams=...)` is
called. The parameters are therefore plain entries of the model's state dict,
`fusion.streams.<modality>.{norm,proj,position,attend,gate}.*`, and checkpoints, their
validation, DDP/FSDP, resume and `bastion predict` treat a fused model as any other. Its
initial weights come from `initial_weights` (seeded, PyTorch's default initialisations), not
from the transformer's N(0, init_std) init, so a fused model started from a text model
begins with the gates half open on small attended vectors.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class FrameBatch:
    """One modality of a batch: frames [B, F, features] zero-padded to the longest example,
    frame_mask [B, F] (True: a real frame), present [B] (False: the example lacks it)."""

    frames: torch.Tensor
    frame_mask: torch.Tensor
    present: torch.Tensor

    @classmethod
    def from_batch(cls, batch: Mapping[str, torch.Tensor], name: str) -> FrameBatch:
        """Modality `name` of a collated batch (data/features.py pad_frames: streams.<name>.*)."""
        prefix = f"streams.{name}."  # data/features.py STREAM_KEY (model/ cannot import data/: same layer)
        return cls(batch[prefix + "frames"], batch[prefix + "frame_mask"], batch[prefix + "present"])


def batch_streams(batch: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, FrameBatch] | None:
    """{modality: FrameBatch} of the modalities `names` (model.modalities) from a collated
    batch; None for a text model (no names)."""
    return {name: FrameBatch.from_batch(batch, name) for name in names} or None


class ModalityStream(nn.Module):
    """One modality: its frames projected to d_model, attended to from the text states."""

    def __init__(self, features: int, max_frames: int, d_model: int, n_modalities: int, n_head: int):
        super().__init__()
        self.norm = nn.LayerNorm(features)
        self.proj = nn.Linear(features, d_model)
        self.position = nn.Embedding(max_frames, d_model)  # frame order: cheap, learned, bounded by max_frames
        self.attend = nn.MultiheadAttention(d_model, n_head, batch_first=True)
        self.gate = nn.Linear(d_model * (1 + n_modalities), d_model)

    def attended(self, text: torch.Tensor, batch: FrameBatch) -> torch.Tensor:
        """[B, T, D]: what each text position reads from this modality; zero where absent."""
        F = batch.frames.size(1)
        keys = self.proj(self.norm(batch.frames)) + self.position.weight[:F]
        # An absent example has no real frame; an all-masked row would give NaN softmax, so it
        # attends to its (zero) first frame and its result is replaced by zero below.
        usable = batch.frame_mask.clone()
        usable[:, 0] |= ~batch.present
        out, _ = self.attend(text, keys, keys, key_padding_mask=~usable, need_weights=False)
        return torch.where(batch.present[:, None, None], out, torch.zeros_like(out))


class Fusion(nn.Module):
    """The text states mixed with every modality through gates (module docstring)."""

    def __init__(self, modalities: Mapping[str, tuple[int, int]], d_model: int, n_head: int = 4,
                 modality_dropout: float = 0.0):
        """`modalities`: {name: (features, max_frames)}, as finetune.sequence.modalities declares."""
        super().__init__()
        if not modalities:
            raise ValueError("fusion needs at least one modality")
        self.names = sorted(modalities)  # a fixed order: the gates read the attended vectors in it
        self.modality_dropout = modality_dropout
        self.streams = nn.ModuleDict({
            name: ModalityStream(modalities[name][0], modalities[name][1], d_model, len(self.names), n_head)
            for name in self.names})

    def forward(self, text: torch.Tensor, batches: Mapping[str, FrameBatch]) -> torch.Tensor:
        """[B, T, D] final-norm text states -> fused states of the same shape. A modality not
        in `batches` is missing for every example."""
        present = {name: self._present(batches[name].present) if name in batches else None for name in self.names}
        attended = {}
        for name in self.names:
            if present[name] is None:
                attended[name] = torch.zeros_like(text)
            else:
                batch = FrameBatch(batches[name].frames, batches[name].frame_mask, present[name])
                attended[name] = self.streams[name].attended(text, batch)
        context = torch.cat([text, *(attended[name] for name in self.names)], dim=-1)
        fused = text
        for name in self.names:
            if present[name] is None:
                continue
            gate = torch.sigmoid(self.streams[name].gate(context))
            mixed = gate * attended[name]
            fused = fused + torch.where(present[name][:, None, None], mixed, torch.zeros_like(mixed))
        return fused

    def _present(self, present: torch.Tensor) -> torch.Tensor:
        """Modality dropout: while training, each example loses the modality with probability
        modality_dropout, so the model learns to answer without it."""
        if not self.training or self.modality_dropout == 0.0:
            return present
        keep = torch.rand(present.shape, device=present.device) >= self.modality_dropout
        return present & keep


def modality_shapes(modalities: Mapping[str, object]) -> dict[str, tuple[int, int]]:
    """{name: (features, max_frames)} of model.modalities (ModalityConfig objects)."""
    return {name: (spec.features, spec.max_frames) for name, spec in modalities.items()}  # type: ignore[attr-defined]


def initial_weights(modalities: Mapping[str, object], d_model: int, n_head: int, seed: int) -> dict[str, torch.Tensor]:
    """A new fusion's weights, named as a Transformer's state dict holds them ("fusion....");
    the same seed gives the same tensors, and the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fusion = Fusion(modality_shapes(modalities), d_model, n_head)
    return {f"fusion.{name}": t.detach() for name, t in fusion.state_dict().items()}


__all__ = ["FrameBatch", "Fusion", "ModalityStream", "batch_streams", "initial_weights", "modality_shapes"]
