"""Data-parallel training under `torchrun`: detection, process group, and the few collectives
the loop needs.

`torchrun --nproc_per_node N -m bastion.cli train -c cfg.yaml` (or `bastion train` under any
launcher that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) runs N
replicas with DistributedDataParallel: NCCL on CUDA GPUs (one per local rank), gloo on CPU.

Data: every rank walks the same seeded block order and takes its own slice of each global
batch (rank r: blocks [r*B, (r+1)*B) of the next N*B), so the ranks read disjoint data and N
ranks with batch B see exactly the batches one process with batch N*B would: the same loss
curve, which is what makes a checkpoint written with N ranks resumable with M.

`train.parallel: fsdp` shards parameters, gradients and optimizer state instead (FSDP2
`fully_shard` on every transformer block and the root). Its checkpoints are the same
format: every rank joins in gathering the full state (torch.distributed.checkpoint's
state-dict API, full_state_dict on CPU: no DCP `.metadata` pickle is ever written), rank 0
writes it, and a resume on any number of ranks - FSDP, DDP or one process - loads it.

Checkpoints: replicas hold identical weights and optimizer state, so rank 0 writes the
normal (atomic, manifest-verified, pickle-free) checkpoint and every rank waits at a barrier
until it is committed. Logging, progress and the metrics file are rank 0's.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from bastion.errors import CheckpointError, ConfigError
from bastion.train.optim import tensors_to_state_dict


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


_control_group = None  # the CPU (gloo) process group beside NCCL; None: the default group is gloo
CONTROL_TIMEOUT = timedelta(hours=2)  # how long ranks wait for each other on the host (e.g. a checkpoint write)


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
        if use_cuda:  # bound to this rank's GPU: no guessing which device a barrier uses
            dist.init_process_group("nccl", rank=env.rank, world_size=env.world, device_id=device)
        else:
            dist.init_process_group("gloo", rank=env.rank, world_size=env.world, timeout=CONTROL_TIMEOUT)
    global _control_group
    # Host-side agreements (stop requests, waiting for rank 0 to write a checkpoint) go over
    # gloo with a long timeout: writing a large checkpoint can outlast NCCL's 10 minutes.
    _control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT) if use_cuda else None
    return env, device


def barrier(env: DistEnv) -> None:
    """Every rank waits here for the others (on the host: gloo, CONTROL_TIMEOUT)."""
    if env.enabled:
        dist.barrier(group=_control_group)


def mean_across_ranks(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of `value` over all ranks (the loss every rank reports); `value` is untouched."""
    if not env.enabled:
        return value
    return sum_across_ranks(value.detach().clone(), env.world) / env.world


def sum_across_ranks(values: torch.Tensor, world: int) -> torch.Tensor:
    """`values` summed over all `world` ranks, in place (and returned). One process: unchanged."""
    if world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def split_rows(batch: dict[str, torch.Tensor], rank: int, world: int) -> tuple[dict[str, torch.Tensor], bool]:
    """This rank's contiguous, balanced share of a global batch's rows (scalars such as
    `num_tokens` stay the global value), and whether the share is real. A rank left without
    rows (a short last batch) gets the first row again, to be weighted 0: under FSDP every
    forward is a collective, so every rank must run the same number of them."""
    if world == 1:
        return batch, True
    rows = next(v.size(0) for v in batch.values() if v.dim() > 0)
    start, end = rows * rank // world, rows * (rank + 1) // world
    real = end > start
    if not real:
        start, end = 0, 1
    return {k: v[start:end] if v.dim() > 0 else v for k, v in batch.items()}, real


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every rank if it is True on any (a stop request must stop all replicas at the
    same step, or the others would wait forever in the next all-reduce). Asked every step,
    so it runs on the CPU (gloo) group: a GPU tensor here would make the host wait for the
    GPU's queue to drain every step."""
    if not env.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control_group)
    return bool(t.item())


def shard_model(model: torch.nn.Module, bf16: bool = False) -> None:
    """FSDP2: each transformer block is one unit (its parameters all-gathered just before it
    runs, freed after), the root holds the rest (embeddings, final norm, head). With bf16,
    parameters are gathered and used in bf16 (half the traffic) while the sharded master
    weights, gradient reduction and optimizer stay float32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def _param_names(optimizer: torch.optim.Optimizer) -> list[str]:
    # Our param groups carry the parameter names in order (Transformer.param_groups).
    return [name for group in optimizer.param_groups for name in group["names"]]


def full_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool,
                        with_optimizer: bool = True) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(model state dict, index-keyed optimizer state dict or None) of the whole model.
    Under FSDP a collective: every rank must call it; only rank 0 gets the tensors
    (gathered to CPU, where rank 0 then holds the whole state once)."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict() if with_optimizer else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    if not with_optimizer:
        return model_sd, None
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    names = _param_names(optimizer)
    state = {i: by_name["state"][name] for i, name in enumerate(names) if name in by_name.get("state", {})}
    groups, offset = [], 0
    for group in optimizer.param_groups:
        n = len(group["params"])
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(range(offset, offset + n))})
        offset += n
    return model_sd, {"state": state, "param_groups": groups}


def _my_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's piece of `full`, laid out like the FSDP2 parameter `like` (dim 0 split as
    torch.chunk splits it). Every rank holds the whole checkpoint, so no communication."""
    local = like.to_local()
    mesh = like.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    chunks = torch.chunk(full, world, dim=0)
    piece = chunks[rank] if rank < len(chunks) else full.new_empty((0, *full.shape[1:]))
    if tuple(piece.shape) != tuple(local.shape):
        raise CheckpointError(f"tensor of shape {tuple(full.shape)} does not shard like the model's {tuple(like.shape)}")
    return piece


def load_sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict[str, torch.Tensor],
                       opt_tensors: dict[str, torch.Tensor], opt_meta: dict[str, str]) -> None:
    """Load a full (unsharded) checkpoint, already checked against the model, into an FSDP
    model and its optimizer: each rank copies in its own shard of every tensor. `model_sd`
    may name a subset of the parameters (a LoRA run's checkpoint: the adapters)."""
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters(remove_duplicate=False))  # a tied weight under each name
    with torch.no_grad():
        for name, full in model_sd.items():
            param = params[name]
            param.to_local().copy_(_my_shard(full, param))
    index_sd = tensors_to_state_dict(optimizer, opt_tensors, opt_meta)
    names = _param_names(optimizer)
    for i, slots in index_sd["state"].items():
        if i >= len(names):
            raise CheckpointError("optimizer state does not fit this model (more parameters than the model has)")
        param = params[names[i]]
        for key, value in slots.items():
            if isinstance(param, DTensor) and value.shape == param.shape and value.dim() > 0:
                slots[key] = DTensor.from_local(_my_shard(value, param).to(param.to_local().device).clone(),
                                                param.device_mesh, param.placements, shape=param.shape,
                                                stride=param.stride(), run_check=False)
    try:
        optimizer.load_state_dict(index_sd)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"optimizer state does not fit this model: {exc}") from None


def shutdown(env: DistEnv) -> None:
    """Tear the process groups down while the interpreter is fully alive. First every object
    that may hold a collective's work (FSDP / DDP state in reference cycles) is freed: left to
    interpreter exit, gloo's threads can still hold such work, and the process aborts
    ("terminate called without an active exception", seen ~1 run in 50 under heavy load)."""
    if env.enabled and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


__all__ = ["DistEnv", "any_rank", "barrier", "full_training_state", "init_distributed", "load_sharded_state",
           "mean_across_ranks", "shard_model", "shutdown", "split_rows", "sum_across_ranks"]
