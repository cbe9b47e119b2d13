"""Sequence-scoring heads: a reward model (or a K-label classifier) is the transformer with
`score = Linear(d_model, K, bias=False)` in place of the lm head, read at each sequence's
last non-padding token. That is exactly what transformers' `LlamaForSequenceClassification`
(and Mistral's, Qwen2's) computes - the final hidden state after the final norm, through
`score`, at the rightmost token that is not the pad token - so `bastion export hf` writes a
model that scores what Bastion trained.

Where the head lives: `Transformer` builds `score` instead of `output` when
`model.score_labels` is K (None: a language model). A wrapper module would rename every
parameter ("model.layers.0...") and need every loop hook (FSDP sharding, LoRA, param groups,
activation checkpointing) forwarded; one optional attribute keeps the names flat
(`score.weight` beside `norm.weight`, also transformers' name), so checkpoints, their
name/shape validation, DDP/FSDP and resume treat a scoring model as any other. This module
holds only what is specific to scoring: pooling, and turning a language model's weights into
a scoring model's. Classification / regression with K labels reuses both unchanged.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from bastion.config.schema import ModelConfig

LM_HEAD = "output.weight"
SCORE_HEAD = "score.weight"


def last_token_index(ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[B, T] ids -> [B] index of each row's rightmost token that is not `pad_id` (0 for a row
    of padding only): transformers' rule, so right padding, left padding and a pad token that
    doubles as eos all pool where an exported model pools."""
    non_pad = (ids != pad_id).to(torch.int32)
    positions = torch.arange(ids.size(-1), device=ids.device, dtype=torch.int32)
    return (positions * non_pad).argmax(-1)


def pool_last(values: torch.Tensor, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[B, T, K] per-position head outputs -> [B, K] at each row's last non-padding token."""
    rows = torch.arange(values.size(0), device=values.device)
    return values[rows, last_token_index(ids, pad_id).to(values.device)]


def sequence_scores(forward: Callable[..., Any], ids: torch.Tensor, pad_id: int,
                    streams: Mapping[str, Any] | None = None) -> torch.Tensor:
    """[B, K] scores of right- (or left-) padded sequences under a scoring model; `forward`
    is the model or its DDP/compiled wrapper (its forward returns [B, T, K] values first).
    `streams` ({modality: FrameBatch}) feed a fused model's fusion (model/fusion.py)."""
    values, _ = forward(ids) if streams is None else forward(ids, streams=streams)
    return pool_last(values, ids, pad_id)


def scoring_config(cfg: ModelConfig, labels: int) -> ModelConfig:
    """A language model's config as a scoring model with `labels` outputs."""
    return cfg.model_copy(update={"score_labels": labels})


def scoring_weights(state: dict[str, torch.Tensor], cfg: ModelConfig, labels: int) -> dict[str, torch.Tensor]:
    """A language model's weights with the lm head dropped and a zero score head added.

    Zeros, not a random init: every text starts at reward 0 - no arbitrary preferences to
    unlearn, an initial Bradley-Terry loss of exactly log 2 - and nothing is drawn from the
    RNG, so the start is the same whatever the seed. Training still starts at once: the
    head's gradient is sigma(-z) (h_chosen - h_rejected), non-zero; the trunk's gradient
    (through the head's weights) follows from the second step."""
    out = {name: t for name, t in state.items() if name != LM_HEAD}
    ref = state["norm.weight"]
    out[SCORE_HEAD] = torch.zeros(labels, cfg.d_model, dtype=ref.dtype, device=ref.device)
    return out


def base_weights_for(state: dict[str, torch.Tensor], cfg: ModelConfig,
                     labels: int | None) -> dict[str, torch.Tensor]:
    """A LoRA run's base weights as the model its adapters were trained on: a language-model
    base of a classify / regress run gets the (zero) score head the run started from, which
    the run's own trained score.weight then replaces. Anything else is returned unchanged
    (the shapes are checked against the run's model by the caller)."""
    if labels is None or cfg.score_labels is not None:
        return state
    return scoring_weights(state, scoring_config(cfg, labels), labels)


def hf_label_fields(objective: str, labels: list[str] | None, size: int) -> dict[str, Any]:
    """What transformers' config.json says about a scoring model's outputs: classify ->
    id2label / label2id with the class names and problem_type single_label_classification;
    regress -> problem_type regression (its built-in loss is then MSE, as ours by default).
    Other objectives (reward): nothing beyond the generic LABEL_i names."""
    if objective == "classify" and labels is not None and len(labels) == size:
        return {"id2label": {str(i): name for i, name in enumerate(labels)},
                "label2id": {name: i for i, name in enumerate(labels)},
                "problem_type": "single_label_classification"}
    if objective == "regress" and size == 1:
        return {"problem_type": "regression"}
    return {}


__all__ = ["LM_HEAD", "SCORE_HEAD", "base_weights_for", "hf_label_fields", "last_token_index", "pool_last", "scoring_config", "scoring_weights",
           "sequence_scores"]
