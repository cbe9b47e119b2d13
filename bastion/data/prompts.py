"""Prompt JSONL for online RL (GRPO): what the policy is asked, and what its rewards check.

    {"prompt": "What is 17 + 25?", "answer": "42"}
    {"prompt": [{"role": "system", ...}, {"role": "user", "content": "..."}], "tests": "assert f(1) == 2"}

`prompt` is a string (one user turn, rendered with the model's chat template, as preference
prompts are) or a conversation ending with a user (or tool) message. Every other top-level
field is handed to the rewards with the prompt as `Sample.record` (e.g. `answer`, `tests`,
`schema`; a reward model reads `prompt` itself, so it renders the prompt with its own
template); rewards say which fields they read and name them when missing.
Reading is the fine-tuning reader's (`data/finetune.py`): the file is confined to
`data.allowed_roots`, streamed with `finetune.max_file_bytes` and a bound per line, every
problem reported as file:line, prompts longer than `finetune.max_length` tokens dropped and
counted.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from bastion.data.finetune import LoadReport, read_examples
from bastion.errors import DataError
from bastion.safepath import Roots
from bastion.tokenizer.chat import ChatFormat, ChatTooLongError, check_conversation


@dataclass(frozen=True)
class Prompt:
    ids: list[int]  # the prompt as the model sees it, ending with the assistant header
    text: str  # the same, rendered as text (what a reward model reads before the completion)
    record: dict[str, Any]  # the whole line: "prompt" and the fields rewards read
    stop_ids: tuple[int, ...]  # end-of-turn ids generation stops on


def parse_prompt_record(record: Any) -> tuple[str | list[dict[str, str]], dict[str, Any]]:
    """(the prompt, the whole record) of one line, or a DataError saying what is wrong."""
    if not isinstance(record, dict):
        raise DataError(f"record must be a JSON object, got {type(record).__name__}")
    if "prompt" not in record:
        raise DataError("missing field 'prompt'")
    prompt, rest = record["prompt"], dict(record)
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DataError("'prompt' is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError("'prompt' is not valid Unicode (lone surrogate)") from None
        return prompt, rest
    if isinstance(prompt, list):
        try:
            return check_conversation(prompt, ends_with=("user", "tool")), rest
        except DataError as exc:
            raise DataError(f"'prompt': {exc}") from None
    raise DataError(f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}")


class PromptDataset:
    """Prompts walked by a `BatchCursor`: a batch is a list of prompt indices."""

    kind = "prompts"

    def __init__(self, prompts: list[Prompt], report: LoadReport | None = None):
        self.prompts, self.report = prompts, report

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    @property
    def max_length(self) -> int:
        return max(len(p.ids) for p in self.prompts)

    def plan(self, batch_size: int, seq_len: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[list[int]]]:
        """Batches of `batch_size` prompt indices (the last one may be short), seeded order."""
        order = np.arange(len(self.prompts))
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(len(self.prompts))
        rows = [[int(i)] for i in order]
        return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]

    def collate(self, rows: list[list[int]], seq_len: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor([r[0] for r in rows], dtype=torch.long)}

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p in self.prompts:
            h.update(np.asarray(p.ids, dtype=np.int64).tobytes())
            h.update(b"\0")
        return h.hexdigest()


def load_prompts(path: str | os.PathLike[str], chat: ChatFormat, cfg: Any, roots: Roots | Sequence[str], *,
                 what: str = "finetune.train_file") -> PromptDataset:
    """Read, validate and tokenize a prompt JSONL file (see the module docstring). `cfg` is
    the FinetuneConfig (max_length, max_examples, max_file_bytes)."""

    def convert(record: Any, validate_only: bool) -> Prompt | None:
        prompt, rest = parse_prompt_record(record)
        if validate_only:
            return None
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = chat.encode_prompt(messages)
        if len(ids) > cfg.max_length:
            raise ChatTooLongError("longer than finetune.max_length")
        return Prompt(ids, chat.render(messages, add_generation_prompt=True), rest, tuple(chat.stop_ids))

    prompts, report = read_examples(path, cfg, roots, what, convert)
    return PromptDataset(prompts, report)


__all__ = ["Prompt", "PromptDataset", "load_prompts", "parse_prompt_record"]
