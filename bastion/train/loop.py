"""The training recipe, top to bottom: data -> model -> optimizer -> (resume) -> steps ->
validation -> checkpoints. One loop serves every objective (train/tasks.py): `clm`
pretrains on token shards; `sft`, `dpo` and `simpo` start from `finetune.init_from` (a
Bastion checkpoint or one made by `bastion import hf`), optionally with LoRA adapters."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import yaml

from bastion.checkpoint import Checkpoint, Retention, list_checkpoints, load_checkpoint, save_checkpoint
from bastion.checkpoint.checkpoint import resolve_checkpoint
from bastion.checkpoint.safetensors_check import check_against_model, check_finite
from bastion.config.load import to_yaml
from bastion.config.schema import BastionConfig, ModelConfig
from bastion.data.shards import TokenShards, read_tokenizer_json
from bastion.errors import CheckpointError, ConfigError
from bastion.infer.loading import chat_format_from_checkpoint, config_from_checkpoint, tokenizer_from_checkpoint, tokenizer_state
from bastion.model import Transformer
from bastion.model.lora import BASE_SHA_KEY, apply_lora, is_lora_name, load_lora_state_dict, lora_state_dict, manifest_sha256, save_adapter
from bastion.safeio import make_private_dir, replace_file
from bastion.tokenizer.chat import ChatFormat
from bastion.train.metrics import MetricsLogger, peak_flops
from bastion.train.optim import build_optimizer, optimizer_from_tensors, state_dict_to_tensors
from bastion.train.progress import TrainProgress
from bastion.train.schedule import lr_at
from bastion.train.signals import StopRequest
from bastion.train.distributed import (
    DistEnv,
    any_rank,
    barrier,
    full_training_state,
    init_distributed,
    load_sharded_state,
    mean_across_ranks,
    shard_model,
    shutdown,
)
from bastion.train.tasks import CLMTask, PreferenceTask, SFTTask

if TYPE_CHECKING:
    from bastion.train.dp import PrivateTraining


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    final_train_loss: float | None
    final_val_loss: float | None
    checkpoint: Path | None
    stopped_by: str | None = None
    losses: list[float] = field(default_factory=list)
    epsilon: float | None = None  # DP runs: privacy spent (at the run's delta)
    val_metrics: dict[str, float] = field(default_factory=dict)  # the last validation's numbers
    adapter: Path | None = None  # LoRA runs: the adapter folder (run_dir/adapter)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def use_bf16(dtype: str, device: torch.device) -> bool:
    """bf16 autocast: on by default on CUDA GPUs that support it; opt-in elsewhere."""
    if dtype == "bfloat16":
        return True
    if dtype == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return False


def model_config_for_data(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    if cfg.vocab_size is None:
        return cfg.model_copy(update={"vocab_size": vocab_size})
    if cfg.vocab_size < vocab_size:
        raise ConfigError(f"model.vocab_size ({cfg.vocab_size}) is smaller than the tokenizer's vocabulary ({vocab_size})")
    return cfg


@dataclass
class StartPoint:
    """The checkpoint a fine-tuning run starts from (finetune.init_from), verified."""

    checkpoint: Checkpoint
    model_cfg: ModelConfig
    chat: ChatFormat
    directory: Path
    manifest_sha256: str


def load_start_point(cfg: BastionConfig) -> StartPoint:
    path = cfg.finetune.init_from
    assert path is not None  # the config requires it for fine-tuning objectives
    try:
        directory = resolve_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"finetune.init_from: {exc}") from None
    sha = manifest_sha256(directory)
    ckpt = load_checkpoint(directory, verify=True, load_optimizer=False, reject_nonfinite=cfg.checkpoint.reject_nonfinite)
    if manifest_sha256(directory) != sha:
        raise CheckpointError(f"{directory}: MANIFEST.json changed while it was being loaded")
    if any(is_lora_name(k) for k in ckpt.model):
        raise CheckpointError(f"finetune.init_from {directory} holds LoRA adapters, not a full model; "
                              "fold them into their base first with `bastion merge BASE RUN OUT`")
    model_cfg = config_from_checkpoint(ckpt).model
    if model_cfg.vocab_size is None:
        raise CheckpointError(f"{directory}/config.yaml: model.vocab_size is not set")
    with torch.device("meta"):
        check_against_model(ckpt.model, Transformer(model_cfg).state_dict(), directory / "model.safetensors")
    if cfg.train.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"train.seq_len ({cfg.train.seq_len}) exceeds the max_seq_len ({model_cfg.max_seq_len}) "
                          f"of finetune.init_from {directory}")
    tokenizer = tokenizer_from_checkpoint(ckpt)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise CheckpointError(f"{directory}: tokenizer has {tokenizer.vocab_size} tokens, the model only {model_cfg.vocab_size}")
    return StartPoint(ckpt, model_cfg, chat_format_from_checkpoint(ckpt, tokenizer), directory, sha)


def train(
    cfg: BastionConfig,
    *,
    resume: bool = False,
    quiet: bool = False,
    should_stop: Callable[[int], bool] | None = None,
) -> TrainResult:
    """Run (or resume) training as `cfg` says. `should_stop(step)` lets a caller end the run
    early the way a signal does: finish the step, checkpoint, return."""
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    # Signals are caught from before the process group exists until after it is gone. Under
    # torchrun a SIGTERM that killed one rank by the default action (while it joined the group,
    # built the model, or shut down) made torchrun tear down the others mid-collective and fail
    # the run; caught, it is a stop request the ranks agree on after the next step, as in training.
    with StopRequest() as stop:
        env, dist_device = init_distributed(tc.device)  # under torchrun: one data-parallel replica per process
        try:
            return _train(cfg, env, dist_device or resolve_device(tc.device), stop, resume=resume,
                          quiet=quiet or not env.main, should_stop=should_stop)
        finally:
            shutdown(env)


class _NoMetrics:
    """What ranks other than 0 log to: nothing (rank 0 writes metrics.jsonl and TensorBoard)."""

    def log(self, kind: str, step: int, **values: float) -> None:
        pass

    def close(self) -> None:
        pass


def _train(cfg: BastionConfig, env: DistEnv, device: torch.device, stop: StopRequest, *, resume: bool, quiet: bool,
           should_stop: Callable[[int], bool] | None) -> TrainResult:
    tc = cfg.train
    if env.enabled and tc.dp.enabled:
        # Per-example clipping and the privacy accounting assume one process drawing the batches.
        raise ConfigError("train.dp (DP-SGD) runs in a single process; launch it without torchrun")
    bf16 = use_bf16(tc.dtype, device)
    if device.type == "cuda":  # what float32 matmuls run on (bf16 autocast ones are unaffected)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tc.tf32
    run_dir = Path(tc.out_dir)
    ckpt_root = run_dir / "checkpoints"
    if list_checkpoints(ckpt_root) and not resume:
        raise ConfigError(
            f"{run_dir} already holds checkpoints; pass --resume to continue that run or choose another train.out_dir"
        )

    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    lora = cfg.finetune.lora.enabled
    start: StartPoint | None = None
    if tc.objective == "clm":
        data_dir = Path(tc.data_dir)
        train_shards = TokenShards(data_dir, "train", verify=True)
        task: CLMTask | SFTTask | PreferenceTask = CLMTask(cfg, train_shards, TokenShards(data_dir, "val", verify=True),
                                                           rank=env.rank, world=env.world)
        tokenizer_json = read_tokenizer_json(data_dir)
        model_cfg = model_config_for_data(cfg.model, train_shards.vocab_size)
        micro_batches_per_epoch = task.n_examples / (tc.batch_size * env.world)
    else:
        start = load_start_point(cfg)
        task = (SFTTask if tc.objective == "sft" else PreferenceTask)(cfg, start.chat, rank=env.rank, world=env.world)
        tokenizer_json = start.checkpoint.tokenizer_json
        model_cfg = start.model_cfg
        micro_batches_per_epoch = task.batches_per_epoch
    cfg = cfg.model_copy(update={"model": model_cfg})

    # Model and optimizer.
    torch.manual_seed(tc.seed)
    if start is None:
        model = Transformer(model_cfg).to(device)
    else:
        # The loaded tensors become the parameters (float32 master weights): one copy in memory.
        model = Transformer.from_state_dict(model_cfg, start.checkpoint.model).to(device=device, dtype=torch.float32)
        start.checkpoint.model = {}
        if isinstance(task, PreferenceTask):
            model.eval()  # the reference is the starting weights, without dropout
            task.prepare_reference(model, device, autocast)
            model.train()
        if lora:
            apply_lora(model, cfg.finetune.lora)
    model.activation_checkpointing = tc.activation_checkpointing
    model.loss_chunk_tokens = tc.loss_chunk_tokens
    sharded = env.enabled and tc.parallel == "fsdp"
    if sharded:
        shard_model(model, bf16)  # before the optimizer: it must hold the sharded parameters
    optimizer = build_optimizer(model, tc, device)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * micro_batches_per_epoch / tc.grad_accum))
    # DP-SGD (bastion/train/dp.py): when enabled it happens, or the run fails before step one.
    dp = None
    if tc.dp.enabled:
        from bastion.train.dp import PrivateTraining

        assert isinstance(task, CLMTask)  # the config allows DP for clm only
        dp = PrivateTraining(model, tc, n_examples=task.n_examples, total_steps=total_steps)

    step, tokens_seen, val_loss, best_val = 0, 0, None, None
    if resume:
        step, tokens_seen, val_loss, best_val = _restore(ckpt_root, cfg, model, optimizer, task, dp, start, sharded)
    if env.main:
        make_private_dir(run_dir)
        replace_file(run_dir / "config.yaml", to_yaml(cfg).encode())
    barrier(env)
    notes = dp.start(run_dir, step) if dp is not None else []
    if env.enabled:
        unit = f"blocks of {tc.seq_len} tokens" if tc.objective == "clm" else \
            f"{'pairs' if isinstance(task, PreferenceTask) else 'rows'} of up to {tc.seq_len} tokens"
        notes.append(f"data-parallel ({'FSDP2' if sharded else 'DDP'}) on {env.world} ranks, {device.type}: global batch "
                     f"{tc.batch_size * env.world * tc.grad_accum} {unit}")
    if isinstance(task, (SFTTask, PreferenceTask)):
        notes += task.describe()
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        notes.append(f"{tc.objective} from {start.directory}: {trainable:,} of {model.num_params():,} parameters "
                     f"trainable{' (LoRA)' if lora else ''}, {total_steps} steps")
    # What every checkpoint of this run records besides its own progress: for fine-tuning,
    # the tokenizer's specials and chat template, and the exact checkpoint it started from.
    run_state: dict = {}
    if start is not None:
        run_state.update(tokenizer_state(start.checkpoint))
        run_state["init_from"] = {"path": str(start.directory.resolve()), "manifest_sha256": start.manifest_sha256}
        if lora:
            run_state[BASE_SHA_KEY] = start.manifest_sha256

    pusher = _start_pusher(cfg) if cfg.checkpoint.push_to and env.main else None
    forward = model
    if env.enabled and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        # Replicas start identical (DDP broadcasts rank 0's weights) and stay so: gradients
        # are averaged across ranks in backward.
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(forward) if tc.compile else forward
    metrics = MetricsLogger(run_dir, resume_step=step if resume else None) if env.main else _NoMetrics()

    def save(at_step: int) -> Path:
        # Every rank takes part in gathering the state (FSDP); rank 0 writes; all wait for the commit.
        model_sd, opt_sd = full_training_state(model, optimizer, sharded, with_optimizer=cfg.checkpoint.save_optimizer)
        path = _save(at_step, model_sd, opt_sd) if env.main else ckpt_root / f"step_{at_step:08d}"
        barrier(env)
        return path

    def _save(at_step: int, model_sd: dict, opt_sd: dict | None) -> Path:
        opt_tensors, opt_meta = state_dict_to_tensors(opt_sd, type(optimizer).__name__) if opt_sd else (None, {})
        adapters = {name: t for name, t in model_sd.items() if is_lora_name(name)}
        rng = {"torch_cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(device)
        state = {
            **run_state,
            "step": at_step, "tokens_seen": tokens_seen, "val_loss": val_loss, "best_val_loss": best_val,
            "total_steps": total_steps, "sampler": task.state_dict(), "objective": tc.objective,
        }
        if dp is not None:
            state["dp"] = dp.state_dict()
        cc = cfg.checkpoint
        path = save_checkpoint(
            ckpt_root, at_step,
            # A LoRA run stores only its adapters: the base is init_from, pinned by its hash.
            Checkpoint(model=adapters if lora else model_sd, trainer_state=state, config_yaml=to_yaml(cfg),
                       tokenizer_json=tokenizer_json, optimizer=opt_tensors, optimizer_meta=opt_meta, rng=rng),
            retention=Retention(cc.keep_last, cc.keep_best, cc.keep_every), max_shard_bytes=cc.max_shard_bytes,
        )
        if lora:  # the adapter alone, in its own verified folder (bastion merge / export peft)
            save_adapter(model, cfg.finetune.lora, run_dir / "adapter", start.manifest_sha256, tensors=adapters)
        if pusher is not None:
            pusher.submit(path)  # returns at once; a worker thread uploads while training goes on
        return path

    def evaluate() -> dict[str, float]:
        model.eval()
        try:
            # The bare model on every rank (same batches, same result): no collectives needed.
            return task.evaluate(forward if not env.enabled else model, autocast, device, tc.eval_batches)
        finally:
            model.train()

    flops_per_token = model.flops_per_token(tc.seq_len)  # forward + backward, per trained token
    peak = peak_flops(device)
    losses: list[float] = []
    pending: list[tuple[int, torch.Tensor, int]] = []  # (step, loss on the device, tokens) not yet read
    val_metrics: dict[str, float] = {}
    last_loss = None
    last_ckpt: Path | None = None
    stopped_by = None
    model.train()
    progress = TrainProgress(total_steps, start_step=step, quiet=quiet)
    window_start, window_tokens = time.perf_counter(), 0
    try:
        with progress:
            for note in notes:
                progress.note(note)
            while step < total_steps:
                lr = lr_at(step, lr=tc.lr, warmup_steps=tc.warmup_steps, total_steps=total_steps, min_lr_ratio=tc.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                stats: dict[str, torch.Tensor] = {}
                if dp is not None:
                    # A Poisson batch of varying size (possibly empty: then the step is noise only).
                    x, y = task.sampler.read_blocks(dp.sample(step), device)
                    step_tokens = x.numel()
                    step_loss = torch.full((), math.nan, device=device)
                    if len(x):
                        with autocast():
                            _, loss = forward(x, y)
                        loss.backward()
                        step_loss = loss.detach()
                    dp.privatize(step, len(x))  # per-example clip + noise replace the gradients
                else:
                    step_loss = torch.zeros((), device=device)
                    step_tokens = 0
                    for micro in range(tc.grad_accum):
                        # DDP all-reduces gradients in backward; only the last micro-batch needs it.
                        sync = not env.enabled or sharded or micro == tc.grad_accum - 1
                        with contextlib.nullcontext() if sync else forward.no_sync():
                            with autocast():
                                loss, n_tokens, micro_stats = task.micro_batch_loss(forward, device)
                            (loss / tc.grad_accum).backward()
                        step_loss += loss.detach() / tc.grad_accum
                        step_tokens += n_tokens
                        for name, value in micro_stats.items():
                            stats[name] = stats.get(name, 0.0) + value / tc.grad_accum
                    if tc.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += step_tokens  # (tasks count the tokens of the global batch)
                window_tokens += step_tokens
                # The loss stays on the device until the next log step or checkpoint: reading
                # it every step would make the host wait for the GPU each step.
                pending.append((step, step_loss, step_tokens))
                if stop.requested is None and should_stop is not None and should_stop(step):
                    stop.requested = "callback"
                # Read once: a signal landing after this line counts from the next step. Under
                # torchrun only the agreed answer decides, so every rank stops at the same step
                # (a rank stopping alone would leave the others waiting in a collective).
                stopping_by = stop.requested
                if env.enabled and any_rank(stopping_by is not None, env) and stopping_by is None:
                    stopping_by = "another rank"
                log_due = step % tc.log_every == 0 or step == total_steps
                save_due = step % cfg.checkpoint.every_steps == 0 or step == total_steps or stopping_by is not None
                if log_due or save_due:  # (never save weights a non-finite loss has touched)
                    last_loss = _read_losses(pending, losses, env)

                if log_due:
                    elapsed = time.perf_counter() - window_start
                    tps = window_tokens / elapsed if elapsed > 0 else 0.0
                    extra = {"epsilon": dp.epsilon()} if dp is not None else _mean_stats(stats, env)
                    # Model FLOPs utilisation: achieved model FLOP/s over the devices' peak (known GPUs).
                    mfu = flops_per_token * tps / (peak * env.world) if peak else None
                    extra["model_tflops"] = flops_per_token * tps / 1e12
                    if mfu is not None:
                        extra["mfu"] = mfu
                    metrics.log("train", step, loss=last_loss, lr=lr, tokens=tokens_seen, tokens_per_s=tps,
                                epoch=step * dp.sample_rate if dp is not None else task.epochs_done, **extra)
                    window_start, window_tokens = time.perf_counter(), 0
                    progress.update(step, loss=last_loss, lr=lr, tokens_per_s=tps, mfu=mfu)
                else:
                    progress.update(step)
                paused = time.perf_counter()  # validation and checkpoints are not training time
                if task.has_val and (step % tc.eval_every == 0 or step == total_steps):
                    val_metrics = evaluate()
                    val_loss = val_metrics["loss"]
                    best_val = val_loss if best_val is None else min(best_val, val_loss)
                    metrics.log("val", step, **val_metrics)
                    spent = f", epsilon {dp.epsilon():.3f} (delta {dp.delta:.3g})" if dp is not None else ""
                    if "reward_accuracy" in val_metrics:
                        spent += (f", reward accuracy {val_metrics['reward_accuracy']:.3f}, "
                                  f"margin {val_metrics['reward_margin']:.3f}")
                    progress.note(f"step {step}: val loss {val_loss:.4f}{spent}")
                if save_due:
                    last_ckpt = save(step)
                window_start += time.perf_counter() - paused
                if stopping_by is not None:
                    stopped_by = stopping_by
                    progress.note(f"{stopped_by}: saved {last_ckpt} at step {step}; continue with --resume")
                    break
    finally:
        metrics.close()
        if pusher is not None:
            progress.note(f"waiting for checkpoint uploads to {cfg.checkpoint.push_to} ...")
            pusher.close(timeout=3600)
            for problem in pusher.errors:
                progress.note(f"[warning] checkpoint upload failed: {problem}")
    return TrainResult(run_dir, step, tokens_seen, last_loss, val_loss, last_ckpt, stopped_by, losses,
                       dp.epsilon() if dp is not None else None, val_metrics,
                       run_dir / "adapter" if lora and last_ckpt is not None else None)


def _read_losses(pending: list[tuple[int, torch.Tensor, int]], losses: list[float], env: DistEnv) -> float:
    """Move the pending steps' losses (averaged over ranks) to `losses`, in one transfer;
    the newest. A non-finite loss of a step that trained on tokens stops the run."""
    values = mean_across_ranks(torch.stack([loss.float() for _, loss, _ in pending]), env).tolist()
    for (step, _, tokens), value in zip(pending, values):
        if not math.isfinite(value) and tokens:
            raise FloatingPointError(f"training loss became {value} at step {step}; lower train.lr or check the data")
    losses.extend(values)
    pending.clear()
    return values[-1]


def _mean_stats(stats: dict[str, torch.Tensor], env: DistEnv) -> dict[str, float]:
    """The step's task statistics (reward accuracy, margins, ...) over the global batch:
    each rank holds its share-weighted part, so the mean across ranks is the whole."""
    if not stats:
        return {}
    values = mean_across_ranks(torch.stack([torch.as_tensor(v, dtype=torch.float32) for v in stats.values()]), env)
    return dict(zip(stats, values.tolist()))


def _start_pusher(cfg: BastionConfig):
    from bastion.checkpoint.stores import BackgroundPusher, open_store

    cc = cfg.checkpoint
    return BackgroundPusher(open_store(cc.push_to, endpoint_url=cc.endpoint_url, allow_http=cc.allow_http))


def _restore(ckpt_root: Path, cfg: BastionConfig, model: Transformer, optimizer: torch.optim.Optimizer,
             task: CLMTask | SFTTask | PreferenceTask, dp: PrivateTraining | None = None,
             start: StartPoint | None = None, sharded: bool = False) -> tuple[int, int, float | None, float | None]:
    if not list_checkpoints(ckpt_root):
        raise CheckpointError(f"--resume: no checkpoint under {ckpt_root}")
    ckpt = load_checkpoint(ckpt_root, verify=True, reject_nonfinite=cfg.checkpoint.reject_nonfinite)
    state = ckpt.trainer_state
    if state.get("objective", "clm") != cfg.train.objective:
        raise CheckpointError(f"--resume: the checkpoint was trained with objective {state.get('objective', 'clm')}, "
                              f"the config says {cfg.train.objective}")
    if start is not None:
        recorded = (state.get("init_from") or {}).get("manifest_sha256")
        if recorded != start.manifest_sha256:
            raise CheckpointError(f"--resume: the run started from a different checkpoint than finetune.init_from "
                                  f"{start.directory} (its MANIFEST.json hash differs)")
    saved_model = yaml.safe_load(ckpt.config_yaml).get("model", {})
    current = cfg.model.model_dump(mode="json")
    changed = sorted(k for k in current if saved_model.get(k) != current[k])
    if changed:
        raise CheckpointError(f"--resume: model config differs from the checkpoint in {', '.join('model.' + k for k in changed)}")
    if ckpt.optimizer is None:
        raise CheckpointError(f"{ckpt.directory}: has no optimizer state; exact resume needs checkpoint.save_optimizer")
    if sharded:
        if cfg.finetune.lora.enabled:  # adapters only; the frozen base came from init_from
            check_against_model(ckpt.model, lora_state_dict(model), ckpt.directory / "model.safetensors",
                                exact_dtype=False)
            check_finite(ckpt.model, ckpt.directory / "model.safetensors")
        else:
            with torch.device("meta"):
                check_against_model(ckpt.model, Transformer(cfg.model).state_dict(), ckpt.directory)
        load_sharded_state(model, optimizer, ckpt.model, ckpt.optimizer, ckpt.optimizer_meta)
    elif cfg.finetune.lora.enabled:
        load_lora_state_dict(model, ckpt.model, ckpt.directory / "model.safetensors")
        optimizer_from_tensors(optimizer, ckpt.optimizer, ckpt.optimizer_meta)
    else:
        check_against_model(ckpt.model, model.state_dict(), ckpt.directory)
        model.load_state_dict(ckpt.model)
        optimizer_from_tensors(optimizer, ckpt.optimizer, ckpt.optimizer_meta)
    task.load_state_dict(state["sampler"])
    if "torch_cpu" in ckpt.rng:
        torch.set_rng_state(ckpt.rng["torch_cpu"])
    if "torch_cuda" in ckpt.rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt.rng["torch_cuda"])
    # A DP guarantee must cover every step: neither half of a run may be non-private.
    if dp is None and "dp" in state:
        raise CheckpointError("--resume: the checkpoint was trained with train.dp.enabled; resuming without it would "
                              "continue without privacy (set train.dp.enabled: true, or start a new run)")
    if dp is not None:
        if "dp" not in state:
            raise CheckpointError("--resume: train.dp.enabled is set but the checkpoint was trained without DP; "
                                  "steps already taken are not private, so start a new run")
        dp.load_state_dict(state["dp"], int(state["step"]))
    return int(state["step"]), int(state["tokens_seen"]), state.get("val_loss"), state.get("best_val_loss")
