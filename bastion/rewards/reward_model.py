"""`reward_model`: the score a reward model (`train.objective: reward`) gives a completion.

    rewards:
      - name: reward_model
        checkpoint: runs/rm/checkpoints/latest
        weight: 1.0
        batch_size: 8          # sequences per forward pass (1..256)
        device: auto           # cpu | cuda | auto
        normalize: none        # none: the raw score; sigmoid: sigma(score), in (0, 1)
        max_tokens: 1024       # longest scored sequence (default and ceiling: the model's context)

The checkpoint is read like every other: manifest verified, the signature policy in force
when the rewards were built (or stricter, at load time) enforced, safetensors only, never a
pickle; a checkpoint without a score head (a language model) is refused. It is loaded on
the first `score` call - building the rewards (config validation) reads nothing - and
released by `close()`.

Text layout: the one the reward model was trained on (preference JSONL through
`tokenize_preference`): the conversation rendered with the reward checkpoint's own chat
template, its prompt followed by one assistant message holding the completion. The prompt
is the record's "messages" (a chat), else its "prompt" (a message list, or a string as one
user message), else `Sample.prompt` as one user message. The score is read at the last
token (heads.py). A sequence longer than max_tokens keeps its last max_tokens tokens (the
end of the completion, where the score is read); a completion the template cannot render
scores NaN, which a RewardSet counts as 0.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from bastion.checkpoint.signing import signature_policy, trust
from bastion.errors import ConfigError, DataError
from bastion.infer.loading import LoadedModel, load_for_inference
from bastion.model.heads import sequence_scores
from bastion.rewards.registry import Reward, Sample, register_reward

Message = dict[str, str]


def prompt_messages(sample: Sample) -> list[Message]:
    """The conversation before the completion, as the module docstring says."""
    record: Mapping[str, Any] = sample.record
    messages = record.get("messages")
    if isinstance(messages, list):
        return list(messages)
    prompt = record.get("prompt")
    if isinstance(prompt, list):
        return list(prompt)
    text = prompt if isinstance(prompt, str) else sample.prompt
    return [{"role": "user", "content": text}]


@register_reward
class RewardModelReward(Reward):
    """The score of a reward model checkpoint (train.objective reward) for prompt + completion."""

    name = "reward_model"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        checkpoint: str = Field(min_length=1, max_length=4096, description="a reward model checkpoint (or run folder)")
        batch_size: int = Field(default=8, ge=1, le=256)
        device: Literal["cpu", "cuda", "auto"] = "auto"
        normalize: Literal["none", "sigmoid"] = "none"
        max_tokens: int | None = Field(default=None, ge=8, le=1_048_576, description="None: the model's max_seq_len")

    def __init__(self, params: BaseModel):
        super().__init__(params)
        self.params: RewardModelReward.Params
        self._policy = signature_policy()  # the policy of the command or run that built the rewards
        self._loaded: LoadedModel | None = None

    def _model(self) -> LoadedModel:
        if self._loaded is None:
            p = self.params
            device = p.device if p.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            if device == "cuda" and not torch.cuda.is_available():
                raise ConfigError("reward_model.device is 'cuda' but no CUDA device is available",
                                  [("reward_model.device", "no CUDA device")])
            with trust(self._policy.require, self._policy.trusted_keys):
                loaded = load_for_inference(p.checkpoint, device=device, head="score", what="reward_model.checkpoint")
            if loaded.config.model.modalities:  # rollouts are text: the model would score without what it reads
                raise ConfigError(f"reward_model.checkpoint {p.checkpoint} fuses modality streams "
                                  f"({', '.join(sorted(loaded.config.model.modalities))}); a reward scores text only",
                                  [("reward_model.checkpoint", "a fused model needs its feature streams")])
            self._loaded = loaded
        return self._loaded

    def _ids(self, loaded: LoadedModel, sample: Sample, limit: int) -> list[int] | None:
        assert loaded.chat is not None
        messages = prompt_messages(sample) + [{"role": "assistant", "content": sample.completion}]
        try:
            ids, _ = loaded.chat.encode_conversation(messages)
        except DataError:
            return None
        return ids[-limit:]

    @torch.no_grad()
    def score(self, samples: Sequence[Sample]) -> list[float]:
        loaded = self._model()
        limit = min(self.params.max_tokens or loaded.config.model.max_seq_len, loaded.config.model.max_seq_len)
        encoded = [self._ids(loaded, s, limit) for s in samples]
        scores = [math.nan] * len(samples)
        todo = [i for i, ids in enumerate(encoded) if ids]
        for start in range(0, len(todo), self.params.batch_size):
            rows = todo[start:start + self.params.batch_size]
            for i, value in zip(rows, self._score_batch(loaded, [encoded[i] for i in rows])):
                scores[i] = value
        return scores

    def _score_batch(self, loaded: LoadedModel, seqs: list[list[int]]) -> list[float]:
        """Right-padded with the pad id: the score is read at each row's last non-pad token."""
        pad_id = loaded.tokenizer.pad_id
        device = loaded.model.tok_embeddings.weight.device
        ids = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, :len(seq)] = torch.tensor(seq)
        values = sequence_scores(loaded.model, ids.to(device), pad_id)[:, 0].float()
        if self.params.normalize == "sigmoid":
            values = torch.sigmoid(values)
        return values.cpu().tolist()

    def close(self) -> None:
        on_cuda = self._loaded is not None and self._loaded.model.tok_embeddings.weight.is_cuda
        self._loaded = None
        if on_cuda:
            torch.cuda.empty_cache()


__all__ = ["RewardModelReward", "prompt_messages"]
