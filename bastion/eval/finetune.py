"""Evaluations of fine-tuned checkpoints (`bastion eval loss|preferences|generate`).

  * loss         held-out chat JSONL: loss on assistant tokens and perplexity
  * preferences  held-out preference JSONL: loss, reward accuracy and margins. With a
                 reference checkpoint the rewards are DPO's (beta * log-ratio to the
                 reference); without one, SimPO's (beta * mean log-prob of the response),
                 which needs no second model; a reward model's (train.objective reward)
                 are its scores, and the loss its Bradley-Terry loss
  * generate     prompts JSONL -> greedy (or K sampled) completions per prompt scored by
                 the weighted sum of registered rewards (bastion/rewards), with pass@k

Files are confined to `roots` and bounded like training data (finetune.max_file_bytes,
max_examples, max_length from the checkpoint's config).
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bastion.data.finetune import iter_jsonl, load_preferences, load_sft
from bastion.errors import ConfigError, DataError, GenerationLimitError
from bastion.infer.engine import Engine
from bastion.infer.loading import LoadedModel, load_for_inference
from bastion.rewards import Sample, build_rewards
from bastion.rewards.passk import mean_pass_at_k
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
              seq_len: int | None = None, device: str = "cpu", quantize: str | None = None) -> dict[str, float]:
    """Assistant-token loss and perplexity of a checkpoint on a chat JSONL file (`quantize`:
    of its int8 / int4 weight-only quantized model, `load_for_inference`)."""
    loaded = load_for_inference(checkpoint, device=device, quantize=quantize)
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
    n: int  # prompts
    mean: dict[str, float]  # "reward" (the weighted sum) and each reward's label -> mean over all completions
    samples: list[dict[str, Any]] = field(default_factory=list)  # first few, for a look
    samples_per_prompt: int = 1
    pass_at_k: dict[int, float] = field(default_factory=dict)  # k -> mean pass@k over prompts


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


def eval_generate(checkpoint: str | Path, file: str | Path, rewards: Sequence[Mapping[str, Any]], *,
                  roots: Sequence[str] = (".",), max_new_tokens: int | None = None, temperature: float = 0.0,
                  seed: int = 0, max_prompts: int = 10_000, device: str = "cpu", keep_samples: int = 5,
                  batch_size: int = 8, threads: int | None = None, samples: int = 1,
                  pass_threshold: float = 1.0, quantize: str | None = None) -> GenerationEval:
    """Generate `samples` completions per prompt and score them with the weighted sum of
    `rewards` (config entries {name, weight, **params}; `build_rewards`). Prompts run
    `batch_size` at a time through the continuous-batching engine in its batch-invariant
    mode: a completion does not depend on `batch_size` or on its neighbours (sample j of
    prompt i uses seed + i * samples + j, so one sample per prompt is seed + i). A completion
    passes when its total reward is >= pass_threshold; pass@k is reported for k = 1, the
    powers of two below `samples`, and `samples`. `threads`: the decoding thread's CPU
    threads (None: torch's default; 1 is often fastest for small models on few cores).
    `quantize`: generate with the int8 / int4 weight-only quantized model (`load_for_inference`)."""
    if samples > 1 and temperature <= 0:
        raise ConfigError(f"--samples {samples} needs --temperature > 0 (greedy decoding repeats one completion)")
    reward_set = build_rewards(rewards)  # before loading the model: a bad reward fails fast
    try:
        loaded = load_for_inference(checkpoint, device=device, quantize=quantize)
        records = read_prompts(file, roots, loaded.config.finetune.max_file_bytes, max_prompts)
        batch = _generate(loaded, file, records, samples=samples, max_new_tokens=max_new_tokens,
                          temperature=temperature, seed=seed, batch_size=batch_size, threads=threads)
        totals, parts = reward_set.score(batch)
    finally:
        reward_set.close()
    per_prompt = [totals[i * samples:(i + 1) * samples] for i in range(len(records))]
    mean = {"reward": sum(totals) / len(totals)} | {label: sum(v) / len(v) for label, v in parts.items()}
    kept = [{"completion": sample.completion, "reward": totals[i], **{label: v[i] for label, v in parts.items()}}
            for i, sample in enumerate(batch[:keep_samples])]
    passes = [sum(t >= pass_threshold for t in group) for group in per_prompt]
    return GenerationEval(len(records), mean, kept, samples, mean_pass_at_k(passes, samples))


def _generate(loaded: LoadedModel, file: str | Path, records: list[dict[str, Any]], *, samples: int,
              max_new_tokens: int | None, temperature: float, seed: int, batch_size: int,
              threads: int | None) -> list[Sample]:
    """Every prompt's `samples` completions as reward Samples (prompt-major order). Every
    prompt is checked against the limits before any is generated."""
    engine = Engine(loaded.model, loaded.tokenizer, loaded.config.generate, max_batch_size=batch_size,
                    max_queue=len(records) * samples, mode="padded", threads=threads)
    requests = []
    for i, record in enumerate(records):
        if "messages" in record:
            assert loaded.chat is not None
            prompt_ids, stop_ids = loaded.chat.encode_prompt(record["messages"]), loaded.chat.stop_ids
        else:
            prompt_ids, stop_ids = loaded.tokenizer.encode_prompt(record["prompt"]), None
        for j in range(samples):
            try:
                params = engine.params(len(prompt_ids), max_new_tokens=max_new_tokens, temperature=temperature,
                                       seed=seed + i * samples + j, stop_ids=stop_ids)
            except GenerationLimitError as exc:
                raise GenerationLimitError(f"{file}: prompt {i + 1}: {exc}") from None
            requests.append((record, prompt_ids, params))
    with engine:
        handles = [engine.submit(prompt_ids, params) for _, prompt_ids, params in requests]
        results = [handle.result() for handle in handles]
    prompts: dict[int, str] = {}  # decoded once per prompt, not per sample
    return [Sample(completion=result.text, record=record,
                   prompt=prompts.setdefault(id(record), loaded.tokenizer.decode(prompt_ids)),
                   completion_tokens=len(result.token_ids), max_new_tokens=params.max_new_tokens,
                   finish_reason="length" if result.finish_reason == "length" else "stop")
            for (record, prompt_ids, params), result in zip(requests, results)]


__all__ = ["GenerationEval", "eval_generate", "eval_loss", "eval_preferences", "read_prompts"]
