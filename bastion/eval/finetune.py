"""Evaluations of fine-tuned checkpoints (`bastion eval loss|preferences|generate`).

  * loss         held-out chat JSONL: loss on assistant tokens and perplexity
  * preferences  held-out preference JSONL: loss, reward accuracy and margins. With a
                 reference checkpoint the rewards are DPO's (beta * log-ratio to the
                 reference); without one, SimPO's (beta * mean log-prob of the response),
                 which needs no second model; a reward model's (train.objective reward)
                 are its scores, and the loss its Bradley-Terry loss
  * generate     prompts JSONL -> greedy (or sampled) completions scored by verifiable
                 reward functions (bastion/eval/rewards.py)

Files are confined to `roots` and bounded like training data (finetune.max_file_bytes,
max_examples, max_length from the checkpoint's config).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bastion.data.finetune import iter_jsonl, load_preferences, load_sft
from bastion.errors import ConfigError, DataError, GenerationLimitError
from bastion.eval.rewards import Reward
from bastion.infer.engine import Engine
from bastion.infer.loading import LoadedModel, load_for_inference
from bastion.safepath import Roots
from bastion.tokenizer.chat import check_conversation
from bastion.train.tasks.dpo import dpo_pair_loss
from bastion.train.tasks.preference import evaluate_preferences, reference_logprobs
from bastion.train.tasks.reward import pair_scores, reward_loss
from bastion.train.tasks.sft import evaluate_sft
from bastion.train.tasks.simpo import simpo_pair_loss


def _max_len(loaded: LoadedModel, seq_len: int | None) -> int:
    return min(seq_len or loaded.config.model.max_seq_len, loaded.config.model.max_seq_len)


def _finetune_cfg(loaded: LoadedModel, max_length: int):
    return loaded.config.finetune.model_copy(update={"max_length": max_length})


def eval_loss(checkpoint: str | Path, file: str | Path, *, roots: Sequence[str] = (".",), batch_size: int = 8,
              seq_len: int | None = None, device: str = "cpu") -> dict[str, float]:
    """Assistant-token loss and perplexity of a checkpoint on a chat JSONL file."""
    loaded = load_for_inference(checkpoint, device=device)
    length = _max_len(loaded, seq_len)
    data = load_sft(file, loaded.chat, _finetune_cfg(loaded, length).model_copy(update={"pack": False}), roots,
                    what="--file")
    out = evaluate_sft(loaded.model, data, batch_size=batch_size, seq_len=length, device=torch.device(device),
                       autocast=contextlib.nullcontext)
    assert data.report is not None
    return out | {"examples": float(data.report.kept), "dropped_too_long": float(data.report.dropped_too_long)}


def eval_preferences(checkpoint: str | Path, file: str | Path, *, reference: str | Path | None = None,
                     roots: Sequence[str] = (".",), beta: float | None = None, batch_size: int = 8,
                     seq_len: int | None = None, device: str = "cpu") -> dict[str, float]:
    """Preference loss / reward accuracy / margins on held-out pairs (DPO rewards against
    `reference`, else SimPO's reference-free rewards; a reward model's own scores)."""
    loaded = load_for_inference(checkpoint, device=device, head="any")
    length = _max_len(loaded, seq_len)
    data = load_preferences(file, loaded.chat, _finetune_cfg(loaded, length), roots, what="--file")
    if loaded.config.model.score_labels is not None:
        if reference is not None or beta is not None:
            raise ConfigError(f"--reference / --beta: {checkpoint} is a reward model; its rewards are its scores")
        return _eval_reward_model(loaded, data, batch_size=batch_size, seq_len=length, device=torch.device(device))
    cfg = loaded.config
    if beta is not None:
        cfg = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(
            update={"preference": cfg.finetune.preference.model_copy(update={"beta": beta})})})
    dev = torch.device(device)
    kwargs: dict[str, Any] = dict(batch_size=batch_size, seq_len=length, device=dev, autocast=contextlib.nullcontext)
    ref = None
    if reference is not None:
        ref_model = load_for_inference(reference, device=device)
        if ref_model.tokenizer.to_json_str() != loaded.tokenizer.to_json_str():
            raise DataError(f"reference {reference} has a different tokenizer than {checkpoint}")
        ref = reference_logprobs(ref_model.model, data, **kwargs)
        del ref_model
    pc = cfg.finetune.preference
    loss = dpo_pair_loss(pc, ref) if ref is not None else simpo_pair_loss(pc)
    out = evaluate_preferences(loaded.model, data, loss, **kwargs)
    return out | {"beta": cfg.finetune.preference.beta}


def _eval_reward_model(loaded: LoadedModel, data: Any, *, batch_size: int, seq_len: int,
                       device: torch.device) -> dict[str, float]:
    """Bradley-Terry loss, accuracy and margins of a reward model's scores on the pairs."""
    pc = loaded.config.finetune.preference
    pad_id = data.pad_id

    def loss(scores: Any, batch: Any) -> Any:
        return reward_loss(scores, label_smoothing=pc.label_smoothing, center_coef=pc.reward_center_coef)

    return evaluate_preferences(loaded.model, data, loss, batch_size=batch_size, seq_len=seq_len, device=device,
                                autocast=contextlib.nullcontext,
                                values=lambda forward, batch: pair_scores(forward, batch, pad_id))


@dataclass
class GenerationEval:
    n: int
    mean: dict[str, float]  # reward name -> mean score
    samples: list[dict[str, Any]] = field(default_factory=list)  # first few, for a look


def read_prompts(file: str | Path, roots: Sequence[str], max_bytes: int, max_records: int) -> list[dict[str, Any]]:
    """Records with "messages" (a chat ending in a user turn) or "prompt" (text), plus any
    fields rewards read ("answer"). Every bad line is reported as file:line."""
    path = Roots(roots).confine(file, "--file", must_exist=True)
    records, problems = [], []
    for lineno, record, problem in iter_jsonl(path, max_bytes):
        if len(records) >= max_records:
            break
        if problem is None and not isinstance(record, dict):
            problem = "record must be a JSON object"
        elif problem is None and "messages" in record:
            try:
                record["messages"] = check_conversation(record["messages"], ends_with=("user", "tool"))
            except DataError as exc:
                problem = str(exc)
        elif problem is None and not isinstance(record.get("prompt"), str):
            problem = "needs \"messages\" (a chat ending with a user message) or a string \"prompt\""
        if problem is not None:
            problems.append(f"{path}:{lineno}: {problem}")
            continue
        records.append(record)
    if problems:
        raise DataError(f"{len(problems)} invalid record(s):\n  " + "\n  ".join(problems[:20]))
    if not records:
        raise DataError(f"{path}: no prompts")
    return records


def eval_generate(checkpoint: str | Path, file: str | Path, rewards: list[Reward], *, roots: Sequence[str] = (".",),
                  max_new_tokens: int | None = None, temperature: float = 0.0, seed: int = 0,
                  max_prompts: int = 10_000, device: str = "cpu", keep_samples: int = 5,
                  batch_size: int = 8, threads: int | None = None) -> GenerationEval:
    """Generate a completion per prompt and score it with every reward. Prompts run
    `batch_size` at a time through the continuous-batching engine in its batch-invariant
    mode: a prompt's completion does not depend on `batch_size` or on its neighbours
    (prompt i samples with seed + i). `threads`: the decoding thread's CPU threads (None:
    torch's default; 1 is often fastest for small models on few cores)."""
    loaded = load_for_inference(checkpoint, device=device)
    records = read_prompts(file, roots, loaded.config.finetune.max_file_bytes, max_prompts)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.config.generate, max_batch_size=batch_size,
                    max_queue=len(records), mode="padded", threads=threads)
    requests = []  # every prompt checked against the limits before any is generated
    for i, record in enumerate(records):
        if "messages" in record:
            assert loaded.chat is not None
            prompt_ids, stop_ids = loaded.chat.encode_prompt(record["messages"]), loaded.chat.stop_ids
        else:
            prompt_ids, stop_ids = loaded.tokenizer.encode_prompt(record["prompt"]), None
        try:
            params = engine.params(len(prompt_ids), max_new_tokens=max_new_tokens, temperature=temperature,
                                   seed=seed + i, stop_ids=stop_ids)
        except GenerationLimitError as exc:
            raise GenerationLimitError(f"{file}: prompt {i + 1}: {exc}") from None
        requests.append((prompt_ids, params))
    with engine:
        handles = [engine.submit(prompt_ids, params) for prompt_ids, params in requests]
        results = [handle.result() for handle in handles]
    totals = {r.name: 0.0 for r in rewards}
    samples = []
    for record, result in zip(records, results):
        scores = {r.name: r(result.text, record) for r in rewards}
        for name, score in scores.items():
            totals[name] += score
        if len(samples) < keep_samples:
            samples.append({"completion": result.text, **scores})
    return GenerationEval(len(records), {k: v / len(records) for k, v in totals.items()}, samples)


__all__ = ["GenerationEval", "eval_generate", "eval_loss", "eval_preferences", "read_prompts"]
