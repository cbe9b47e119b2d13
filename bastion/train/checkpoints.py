"""A run's checkpoints: where it starts, what each save holds, how `--resume` restores it,
and the background push to a store.

    start_point(cfg, fine_tunes)   the weights, tokenizer and chat format a run starts from:
                                   finetune.init_from (verified), or the prepared data's
                                   tokenizer and fresh weights (pretraining)
    RunCheckpoints.save(...)       every rank gathers its state (FSDP), rank 0 writes the
                                   verified checkpoint (+ the adapter folder of a LoRA run),
                                   all ranks wait for the commit; the push runs in a thread
    RunCheckpoints.restore(...)    the newest checkpoint back into model, optimizer, data
                                   cursor, RNG and step strategy - refusing any change that
                                   would make the resumed run a different run
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from bastion.adapters.folder import load_lora_state_dict, save_adapter, score_head_of
from bastion.checkpoint import Checkpoint, Retention, list_checkpoints, load_checkpoint, save_checkpoint
from bastion.checkpoint.checkpoint import resolve_checkpoint, step_dir_name
from bastion.checkpoint.contents import (
    BASE_SHA_KEY,
    checkpoint_chat,
    checkpoint_config,
    checkpoint_tokenizer,
    load_full_model,
    manifest_sha256,
    tokenizer_state,
)
from bastion.checkpoint.safetensors_check import check_against_model, check_finite
from bastion.checkpoint.signing import load_private_key, trust_config
from bastion.config.load import to_yaml
from bastion.config.schema import BastionConfig, ModelConfig
from bastion.data.shards import read_index, read_tokenizer_json
from bastion.errors import CheckpointError, ConfigError
from bastion.model import Transformer
from bastion.model.lora import is_lora_state_name, lora_state_dict
from bastion.safeio import make_private_dir, replace_file
from bastion.tokenizer.chat import ChatFormat
from bastion.train.distributed import DistEnv, barrier, full_training_state, load_sharded_state
from bastion.train.optim import optimizer_from_tensors, state_dict_to_tensors
from bastion.train.tasks.base import Task


@dataclass
class StartPoint:
    """What a run starts from. `weights` None: a freshly initialised model (pretraining)."""

    model_cfg: ModelConfig
    tokenizer_json: str
    weights: dict[str, torch.Tensor] | None = None
    chat: ChatFormat | None = None
    directory: Path | None = None  # the finetune.init_from checkpoint
    manifest_sha256: str | None = None
    run_state: dict[str, Any] = field(default_factory=dict)  # what every checkpoint of the run records of it


def model_config_for_data(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    if cfg.vocab_size is None:
        return cfg.model_copy(update={"vocab_size": vocab_size})
    if cfg.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.vocab_size}) is smaller than the tokenizer's vocabulary ({vocab_size})")
    return cfg


def start_point(cfg: BastionConfig, fine_tunes: bool) -> StartPoint:
    """finetune.init_from for objectives that fine-tune; else the prepared data's tokenizer."""
    if not fine_tunes:
        data_dir = Path(cfg.train.data_dir)
        return StartPoint(model_config_for_data(cfg.model, read_index(data_dir)["vocab_size"]),
                          read_tokenizer_json(data_dir))
    return _fine_tuning_start(cfg)


def _fine_tuning_start(cfg: BastionConfig) -> StartPoint:
    path = cfg.finetune.init_from
    assert path is not None  # the config requires it for objectives that fine-tune
    try:
        directory = resolve_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"finetune.init_from: {exc}") from None
    sha = manifest_sha256(directory)
    with trust_config(cfg.checkpoint):  # checkpoint.require_signature / trusted_keys
        # Either head: the task decides what it can start from (Task.adapt_start).
        ckpt, config = load_full_model(directory, what="finetune.init_from",
                                       reject_nonfinite=cfg.checkpoint.reject_nonfinite, head="any")
    if manifest_sha256(directory) != sha:
        raise CheckpointError(f"{directory}: MANIFEST.json changed while it was being loaded")
    model_cfg = config.model
    with torch.device("meta"):
        check_against_model(ckpt.model, Transformer(model_cfg).state_dict(), directory / "model.safetensors")
    if cfg.train.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"train.seq_len ({cfg.train.seq_len}) exceeds the max_seq_len ({model_cfg.max_seq_len}) "
                          f"of finetune.init_from {directory}")
    tokenizer = checkpoint_tokenizer(ckpt)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise CheckpointError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens, the model only {model_cfg.vocab_size}")
    # Every checkpoint of the run records the tokenizer's specials and template, and the
    # exact checkpoint it started from (a LoRA run's adapters are useless without it).
    run_state = {**tokenizer_state(ckpt.trainer_state),
                 "init_from": {"path": str(directory.resolve()), "manifest_sha256": sha}}
    if cfg.finetune.lora.enabled:
        run_state[BASE_SHA_KEY] = sha
    return StartPoint(model_cfg, ckpt.tokenizer_json, ckpt.model, checkpoint_chat(ckpt, tokenizer), directory, sha,
                      run_state)


@dataclass
class RunProgress:
    """How far a run is: what a checkpoint records and a resume restores."""

    total_steps: int
    step: int = 0
    tokens_seen: int = 0
    val_loss: float | None = None
    best_val: float | None = None

    def validated(self, val_loss: float) -> None:
        self.val_loss = val_loss
        self.best_val = val_loss if self.best_val is None else min(self.best_val, val_loss)


class StepStrategy(Protocol):
    """The part of a step strategy (bastion/train/steps.py) that checkpoints see."""

    def checkpoint_state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any], step: int) -> None: ...


class RunCheckpoints:
    """The checkpoints of one run (train.out_dir/checkpoints) and its config.yaml."""

    def __init__(self, cfg: BastionConfig, env: DistEnv, start: StartPoint, device: torch.device):
        self.cfg, self.env, self.start, self.device = cfg, env, start, device
        self.run_dir = Path(cfg.train.out_dir)
        self.root = self.run_dir / "checkpoints"
        self.lora = cfg.finetune.lora.enabled
        self.pusher = None

    def begin(self, resume: bool) -> None:
        """Before training: refuse to overwrite another run; rank 0 writes the run's config
        and starts the background pusher; every rank waits for that."""
        if list_checkpoints(self.root) and not resume:
            raise ConfigError(f"{self.run_dir} already holds checkpoints; pass --resume to continue that run or "
                              "choose another train.out_dir")
        if self.env.main:
            if self.cfg.checkpoint.signing_key:
                load_private_key(self.cfg.checkpoint.signing_key)  # a bad key fails now, not at the first save
            make_private_dir(self.run_dir)
            replace_file(self.run_dir / "config.yaml", to_yaml(self.cfg).encode())
            cc = self.cfg.checkpoint
            if cc.push_to:
                from bastion.checkpoint.stores import BackgroundPusher, open_store

                self.pusher = BackgroundPusher(open_store(cc.push_to, endpoint_url=cc.endpoint_url,
                                                          allow_http=cc.allow_http))
        barrier(self.env)

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool, progress: RunProgress,
             task: Task, steps: StepStrategy) -> Path:
        """Checkpoint the run at `progress.step`: a collective (every rank gathers its FSDP
        shards), rank 0 writes, all return once it is committed."""
        model_sd, opt_sd = full_training_state(model, optimizer, sharded,
                                               with_optimizer=self.cfg.checkpoint.save_optimizer)
        path = self.root / step_dir_name(progress.step)
        if self.env.main:
            path = self._write(model, type(optimizer).__name__, model_sd, opt_sd, progress, task, steps)
        barrier(self.env)
        return path

    def _write(self, model: torch.nn.Module, optimizer_class: str, model_sd: dict[str, torch.Tensor],
               opt_sd: dict | None, progress: RunProgress, task: Task, steps: StepStrategy) -> Path:
        opt_tensors, opt_meta = state_dict_to_tensors(opt_sd, optimizer_class) if opt_sd else (None, {})
        # A LoRA run stores only its adapters (and a scoring head): the base is init_from, pinned by its hash.
        weights = {name: t for name, t in model_sd.items() if is_lora_state_name(name)} if self.lora else model_sd
        rng = {"torch_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        state = {**self.start.run_state, "step": progress.step, "tokens_seen": progress.tokens_seen,
                 "val_loss": progress.val_loss, "best_val_loss": progress.best_val,
                 "total_steps": progress.total_steps, "sampler": task.state_dict(),
                 "objective": self.cfg.train.objective, **steps.checkpoint_state()}
        cc = self.cfg.checkpoint
        path = save_checkpoint(
            self.root, progress.step,
            Checkpoint(model=weights, trainer_state=state, config_yaml=to_yaml(self.cfg),
                       tokenizer_json=self.start.tokenizer_json, optimizer=opt_tensors, optimizer_meta=opt_meta,
                       rng=rng),
            retention=Retention(cc.keep_last, cc.keep_best, cc.keep_every), max_shard_bytes=cc.max_shard_bytes,
            signing_key=cc.signing_key,
        )
        if self.lora:  # the adapter alone, in its own verified folder (bastion merge / export peft)
            save_adapter(model, self.cfg.finetune.lora, self.run_dir / "adapter", self.start.manifest_sha256,
                         tensors=weights, signing_key=cc.signing_key, head=score_head_of(self.cfg))
        if self.pusher is not None:
            self.pusher.submit(path)  # returns at once; a worker thread uploads while training goes on
        return path

    def restore(self, model: Transformer, optimizer: torch.optim.Optimizer, sharded: bool, task: Task,
                steps: StepStrategy, total_steps: int) -> RunProgress:
        """The newest checkpoint of the run, loaded into everything that continues it."""
        if not list_checkpoints(self.root):
            raise CheckpointError(f"--resume: no checkpoint under {self.root}")
        with trust_config(self.cfg.checkpoint):
            ckpt = load_checkpoint(self.root, verify=True, reject_nonfinite=self.cfg.checkpoint.reject_nonfinite)
        state = ckpt.trainer_state
        self._check_same_run(ckpt)
        if ckpt.optimizer is None:
            raise CheckpointError(f"{ckpt.directory}: has no optimizer state; exact resume needs checkpoint.save_optimizer")
        self._load_weights(model, optimizer, sharded, ckpt)
        task.load_state_dict(state["sampler"])
        if "torch_cpu" in ckpt.rng:
            torch.set_rng_state(ckpt.rng["torch_cpu"])
        if "torch_cuda" in ckpt.rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(ckpt.rng["torch_cuda"])
        steps.restore(state, int(state["step"]))
        return RunProgress(total_steps, int(state["step"]), int(state["tokens_seen"]), state.get("val_loss"),
                           state.get("best_val_loss"))

    def _check_same_run(self, ckpt: Checkpoint) -> None:
        state = ckpt.trainer_state
        if state.get("objective", "clm") != self.cfg.train.objective:
            raise CheckpointError(f"--resume: the checkpoint was trained with objective {state.get('objective', 'clm')}, "
                                  f"the config says {self.cfg.train.objective}")
        if self.start.directory is not None:
            recorded = (state.get("init_from") or {}).get("manifest_sha256")
            if recorded != self.start.manifest_sha256:
                raise CheckpointError(f"--resume: the run started from a different checkpoint than finetune.init_from "
                                      f"{self.start.directory} (its MANIFEST.json hash differs)")
        saved_cfg = checkpoint_config(ckpt)
        # QLoRA: the adapters were trained over this quantization of the base; another would
        # continue them over a different model (the run's config.yaml records it).
        saved_quant, quant = saved_cfg.finetune.lora.base_quantization, self.cfg.finetune.lora.base_quantization
        if saved_quant != quant:
            raise CheckpointError(f"--resume: the run trained with finetune.lora.base_quantization {saved_quant}, "
                                  f"the config says {quant}")
        saved = saved_cfg.model.model_dump(mode="json")
        current = self.cfg.model.model_dump(mode="json")
        changed = sorted(k for k in current if saved.get(k) != current[k])
        if changed:
            raise CheckpointError(f"--resume: model config differs from the checkpoint in "
                                  f"{', '.join('model.' + k for k in changed)}")

    def _load_weights(self, model: Transformer, optimizer: torch.optim.Optimizer, sharded: bool,
                      ckpt: Checkpoint) -> None:
        where = ckpt.directory / "model.safetensors"
        if sharded:
            if self.lora:  # adapters only; the frozen base came from init_from
                check_against_model(ckpt.model, lora_state_dict(model), where, exact_dtype=False)
                check_finite(ckpt.model, where)
            else:
                with torch.device("meta"):
                    check_against_model(ckpt.model, Transformer(self.cfg.model).state_dict(), ckpt.directory)
            load_sharded_state(model, optimizer, ckpt.model, ckpt.optimizer, ckpt.optimizer_meta)
            return
        if self.lora:
            load_lora_state_dict(model, ckpt.model, where)
        else:
            check_against_model(ckpt.model, model.state_dict(), ckpt.directory)
            model.load_state_dict(ckpt.model)
        optimizer_from_tensors(optimizer, ckpt.optimizer, ckpt.optimizer_meta)

    def close(self) -> list[str]:
        """Wait for the uploads still running (up to an hour); their problems, if any."""
        if self.pusher is None:
            return []
        self.pusher.close(timeout=3600)
        return list(self.pusher.errors)
