"""How one optimizer step gets its gradients: the step strategies the loop calls.

    GradientStep   train.grad_accum micro-batches of the task, DDP syncing gradients on the
                   last one only, then gradient clipping
    PrivateStep    DP-SGD (bastion/train/dp.py): a Poisson-sampled batch, per-example
                   clipping and noise instead of plain gradients

Both are called as `loss, tokens, stats = steps(step)` and then the optimizer steps; both
say what their checkpoints record and what their log lines add.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

from bastion.config.schema import TrainConfig
from bastion.errors import CheckpointError
from bastion.train.distributed import DistEnv, mean_across_ranks
from bastion.train.tasks.base import Autocast, Forward, Stats, Task


class GradientStep:
    def __init__(self, task: Task, forward: Forward, model: torch.nn.Module, tc: TrainConfig, env: DistEnv,
                 sharded: bool, autocast: Autocast, device: torch.device):
        self.task, self.forward, self.model, self.tc = task, forward, model, tc
        self.env, self.sharded, self.autocast, self.device = env, sharded, autocast, device

    def __call__(self, step: int) -> tuple[torch.Tensor, int, Stats]:
        """Gradients of one global batch: (mean loss on the device, tokens, task statistics)."""
        accum = self.tc.grad_accum
        step_loss, step_tokens, stats = torch.zeros((), device=self.device), 0, {}
        for micro in range(accum):
            # DDP all-reduces gradients in backward; only the last micro-batch needs it.
            sync = not self.env.enabled or self.sharded or micro == accum - 1
            with contextlib.nullcontext() if sync else self.forward.no_sync():
                with self.autocast():
                    loss, n_tokens, micro_stats = self.task.micro_batch_loss(self.forward, self.device)
                (loss / accum).backward()
            step_loss += loss.detach() / accum
            step_tokens += n_tokens
            for name, value in micro_stats.items():
                stats[name] = stats.get(name, 0.0) + value / accum
        if self.tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
        return step_loss, step_tokens, stats

    def start(self, run_dir: Any, step: int) -> list[str]:
        return []

    def epochs(self, step: int) -> float:
        return self.task.epochs_done

    def log_values(self, stats: Stats) -> dict[str, float]:
        """The step's task statistics over the global batch: each rank holds its
        share-weighted part, so the mean across ranks is the whole."""
        if not stats:
            return {}
        values = torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in stats.values()])
        return dict(zip(stats, mean_across_ranks(values, self.env).tolist()))

    def summary(self) -> str:
        return ""

    def epsilon(self) -> float | None:
        """Privacy spent (DP-SGD only)."""
        return None

    def checkpoint_state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any], step: int) -> None:
        # A DP guarantee must cover every step: neither half of a run may be non-private.
        if "dp" in state:
            raise CheckpointError("--resume: the checkpoint was trained with train.dp.enabled; resuming without it "
                                  "would continue without privacy (set train.dp.enabled: true, or start a new run)")

