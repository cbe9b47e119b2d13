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

Parameters are named `streams.<modality>.{norm,proj,position,attend,gate}` under whatever
attribute holds the module, so a fused model's weights are plain tensors beside the
transformer's. This module is not wired into training yet: `finetune.sequence.modalities`
is refused by `bastion train` until it is (docs/multimodal.md).
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

    def to(self, device: torch.device | str) -> FrameBatch:
        return FrameBatch(self.frames.to(device), self.frame_mask.to(device), self.present.to(device))


def pad_frames(examples: Sequence[torch.Tensor | None], features: int) -> FrameBatch:
    """A FrameBatch of per-example [frames, features] tensors (None: modality missing)."""
    longest = max([len(x) for x in examples if x is not None], default=1)
    frames = torch.zeros(len(examples), longest, features)
    mask = torch.zeros(len(examples), longest, dtype=torch.bool)
    for row, x in enumerate(examples):
        if x is not None:
            frames[row, : len(x)] = x
            mask[row, : len(x)] = True
    present = torch.tensor([x is not None for x in examples], dtype=torch.bool)
    return FrameBatch(frames, mask, present)


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


def final_states(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[B, T] ids -> [B, T, D] the transformer's final-norm states (what its `score` head
    reads): the trunk of `Transformer.forward` without cache, packing or sliding window."""
    T = ids.size(1)
    window = model.cfg.sliding_window
    if window is not None and T > window:
        raise ValueError(f"{T} tokens exceed the sliding window ({window}); fusion reads whole texts")
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    x = model.tok_embeddings(ids)
    for i, layer in enumerate(model.layers):
        x = layer(x, cos, sin, None, i, 0, None)
    return model.norm(x)


def fused_scores(model: nn.Module, fusion: Fusion, ids: torch.Tensor, pad_id: int,
                 batches: Mapping[str, FrameBatch]) -> torch.Tensor:
    """[B, K] scores of a scoring transformer with fusion, read at each row's last non-pad
    token as the text-only score head is (bastion/model/heads.py)."""
    from bastion.model.heads import pool_last

    values = model.score(fusion(final_states(model, ids), batches))
    return pool_last(values, ids, pad_id)


__all__ = ["FrameBatch", "Fusion", "ModalityStream", "final_states", "fused_scores", "pad_frames"]
