"""Data-parallel training under `torchrun`: detection, process group, and the few collectives
the loop needs.

`torchrun --nproc_per_node N -m bastion.cli train -c cfg.yaml` (or `bastion train` under any
launcher that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) runs N
replicas with DistributedDataParallel: NCCL on CUDA GPUs (one per local rank), gloo on CPU.

Data: every rank walks the same seeded block order and takes its own slice of each global
batch (rank r: blocks [r*B, (r+1)*B) of the next N*B), so the ranks read disjoint data and N
ranks with batch B see exactly the batches one process with batch N*B would: the same loss
curve, which is what makes a checkpoint written with N ranks resumable with M.

Checkpoints: replicas hold identical weights and optimizer state, so rank 0 writes the
normal (atomic, manifest-verified, pickle-free) checkpoint and every rank waits at a barrier
until it is committed. Logging, progress and the metrics file are rank 0's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from bastion.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.isdigit():
        raise ConfigError(f"environment variable {name}={value[:20]!r} is not a non-negative integer")
    return int(value)


def init_distributed(device_name: str) -> tuple[DistEnv, torch.device | None]:
    """DistEnv() and None outside a launcher; otherwise join the process group and return
    the rank's device (cuda:LOCAL_RANK with NCCL when CUDA is used, else CPU with gloo)."""
    world = _int_env("WORLD_SIZE", 1)
    if world <= 1:
        return DistEnv(), None
    env = DistEnv(_int_env("RANK", 0), world, _int_env("LOCAL_RANK", 0))
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if device_name == "cuda" and not use_cuda:
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    if device_name == "mps":
        raise ConfigError("distributed training runs on CUDA (NCCL) or CPU (gloo), not mps")
    if use_cuda:
        torch.cuda.set_device(env.local_rank)
        device = torch.device("cuda", env.local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=env.rank, world_size=env.world)
    return env, device


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def mean_across_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of a scalar over all ranks (the loss every rank reports)."""
    if not env.enabled:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / env.world


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank if it is True on any (a stop request must stop all replicas at the
    same step, or the others would wait forever in the next all-reduce)."""
    if not env.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["DistEnv", "any_rank", "barrier", "init_distributed", "mean_across_ranks", "shutdown"]
