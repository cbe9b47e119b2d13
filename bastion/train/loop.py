"""The training recipe, top to bottom: start point -> task -> model -> optimizer -> (resume)
-> steps -> validation -> checkpoints. One loop serves every objective: what a step reads
and which loss it computes is the task's (bastion/train/tasks/), how its gradients are made
is the step strategy's (bastion/train/steps.py; DP-SGD in dp.py), and what a checkpoint
holds is the run's (bastion/train/checkpoints.py)."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bastion.config.schema import BastionConfig, TrainConfig
from bastion.errors import ConfigError
from bastion.model import Transformer
from bastion.model.lora import apply_lora, lora_disabled, quantize_lora_base, quantized_base
from bastion.train.checkpoints import RunCheckpoints, RunProgress, StartPoint, start_point
from bastion.train.compiling import RunCompileCache
from bastion.train.distributed import (
    DistEnv,
    any_rank,
    barrier,
    init_distributed,
    mean_across_ranks,
    shard_model,
    shutdown,
)
from bastion.train.metrics import MetricsLogger, NoMetrics, peak_flops
from bastion.train.optim import build_optimizer
from bastion.train.progress import TrainProgress
from bastion.train.schedule import lr_at
from bastion.train.signals import StopRequest
from bastion.train.steps import GradientStep
from bastion.train.tasks import Task, task_class


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
    val_summary: str = ""  # what the task adds to the validation loss when reporting it
    compile_cache: list[str] = field(default_factory=list)  # train.compile_cache: hit / miss / refused / saved


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


def train(cfg: BastionConfig, *, resume: bool = False, quiet: bool = False,
          should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Run (or resume) training as `cfg` says. `should_stop(step)` lets a caller end the run
    early the way a signal does: finish the step, checkpoint, return."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    # Signals are caught from before the process group exists until after it is gone. Under
    # torchrun a SIGTERM that killed one rank by the default action (while it joined the group,
    # built the model, or shut down) made torchrun tear down the others mid-collective and fail
    # the run; caught, it is a stop request the ranks agree on after the next step, as in training.
    with StopRequest() as stop:
        env, dist_device = init_distributed(cfg.train.device)  # under torchrun: one data-parallel replica per process
        try:
            result = _train(cfg, env, dist_device or resolve_device(cfg.train.device), stop, resume=resume,
                            quiet=quiet or not env.main, should_stop=should_stop)
            barrier(env)  # ranks leave together: none tears down while another still talks to it
            return result
        finally:
            shutdown(env)


def _train(cfg: BastionConfig, env: DistEnv, device: torch.device, stop: StopRequest, *, resume: bool, quiet: bool,
           should_stop: Callable[[int], bool] | None) -> TrainResult:
    tc = cfg.train
    if env.enabled and tc.dp.enabled:
        # Per-example clipping and the privacy accounting assume one process drawing the batches.
        raise ConfigError("train.dp (DP-SGD) runs in a single process; launch it without torchrun")
    bf16 = use_bf16(tc.dtype, device)
    if device.type == "cuda":  # what float32 matmuls run on (bf16 autocast ones are unaffected)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tc.tf32
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    task_type = task_class(tc.objective)
    start = start_point(cfg, fine_tunes=task_type.fine_tunes)
    task_type.adapt_start(start, cfg)  # e.g. reward, classify: a score head in place of the lm head
    cfg = cfg.model_copy(update={"model": start.model_cfg})
    run = RunCheckpoints(cfg, env, start, device)
    task = task_type(cfg, start, rank=env.rank, world=env.world)
    model = _build_model(cfg, start, task, device, autocast)
    sharded = env.enabled and tc.parallel == "fsdp"
    if sharded:
        shard_model(model, bf16)  # before the optimizer: it must hold the sharded parameters
    optimizer = build_optimizer(model, tc, device)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * task.batches_per_epoch / tc.grad_accum))
    forward = _forward(model, tc, env, sharded, device)
    steps = _step_strategy(task, forward, model, tc, env, sharded, autocast, device, total_steps)
    progress = run.restore(model, optimizer, sharded, task, steps, total_steps) if resume else RunProgress(total_steps)
    run.begin(resume)
    notes = steps.start(run.run_dir, progress.step) + _notes(cfg, env, sharded, task, start, model, total_steps)
    metrics = MetricsLogger(run.run_dir, resume_step=progress.step if resume else None) if env.main else NoMetrics()
    flops_per_token = model.flops_per_token(tc.seq_len)  # forward + backward, per trained token
    peak = peak_flops(device)
    losses: list[float] = []
    pending: list[tuple[int, torch.Tensor, int]] = []  # (step, loss on the device, tokens) not yet read
    val_metrics: dict[str, float] = {}
    last_loss, last_ckpt, stopped_by = None, None, None
    window = _Window()
    bar = TrainProgress(total_steps, start_step=progress.step, quiet=quiet)
    compile_cache = RunCompileCache.open(cfg, device, env, bf16)  # loads in `with`, before the first step
    model.train()
    try:
        with bar, compile_cache:
            for note in notes + compile_cache.notes():
                bar.note(note)
            while progress.step < total_steps:
                lr = lr_at(progress.step, lr=tc.lr, warmup_steps=tc.warmup_steps, total_steps=total_steps,
                           min_lr_ratio=tc.min_lr_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss, step_tokens, stats = steps(progress.step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                progress.tokens_seen += step_tokens  # (tasks count the tokens of the global batch)
                window.tokens += step_tokens
                # The loss stays on the device until the next log step or checkpoint: reading
                # it every step would make the host wait for the GPU each step.
                pending.append((progress.step, step_loss, step_tokens))
                stopping_by = _agreed_stop(stop, should_stop, progress.step, env)
                step = progress.step
                log_due = step % tc.log_every == 0 or step == total_steps
                save_due = step % cfg.checkpoint.every_steps == 0 or step == total_steps or stopping_by is not None
                if log_due or save_due:  # (never save weights a non-finite loss has touched)
                    last_loss = _read_losses(pending, losses, env)
                if log_due:
                    tps = window.tokens_per_s()
                    mfu = flops_per_token * tps / (peak * env.world) if peak else None  # model FLOPs utilisation
                    extra = steps.log_values(stats) | {"model_tflops": flops_per_token * tps / 1e12}
                    if mfu is not None:
                        extra["mfu"] = mfu
                    metrics.log("train", step, loss=last_loss, lr=lr, tokens=progress.tokens_seen,
                                tokens_per_s=tps, epoch=steps.epochs(step), **extra)
                    bar.update(step, loss=last_loss, lr=lr, tokens_per_s=tps, mfu=mfu)
                else:
                    bar.update(step)
                with window.paused():  # validation and checkpoints are not training time
                    if task.has_val and (step % tc.eval_every == 0 or step == total_steps):
                        val_metrics = _evaluate(task, model, forward, env, autocast, device, tc.eval_batches)
                        progress.validated(val_metrics["loss"])
                        compile_cache.save(bar.note)  # training and validation graphs both compiled
                        metrics.log("val", step, **val_metrics)
                        bar.note(f"step {step}: val loss {progress.val_loss:.4f}{steps.summary()}"
                                 f"{task.summary(val_metrics)}")
                    if save_due:
                        last_ckpt = run.save(model, optimizer, sharded, progress, task, steps)
                if stopping_by is not None:
                    stopped_by = stopping_by
                    bar.note(f"{stopped_by}: saved {last_ckpt} at step {step}; continue with --resume")
                    break
            compile_cache.save(bar.note)
    finally:
        metrics.close()
        task.close()
        if run.pusher is not None:
            bar.note(f"waiting for checkpoint uploads to {cfg.checkpoint.push_to} ...")
        for problem in run.close():
            bar.note(f"[warning] checkpoint upload failed: {problem}")
    adapter = run.run_dir / "adapter" if run.lora and last_ckpt is not None else None
    return TrainResult(run.run_dir, progress.step, progress.tokens_seen, last_loss, progress.val_loss, last_ckpt,
                       stopped_by, losses, steps.epsilon(), val_metrics, adapter, task.summary(val_metrics),
                       [f"{event.kind}: {event.detail}" for event in compile_cache.events])


def _build_model(cfg: BastionConfig, start: StartPoint, task: Task, device: torch.device, autocast) -> Transformer:
    """The model at its starting weights (fresh, or the start point's: they become the
    float32 master weights, one copy in memory), prepared for by the task, with LoRA
    adapters if the config asks for them. QLoRA (finetune.lora.base_quantization): the
    wrapped base weights are quantized first, one by one, and the task prepares on that
    quantized base with the adapters off (DPO's and KTO's reference log-probs, GRPO's KL
    reference: the very base the adapters train over)."""
    torch.manual_seed(cfg.train.seed)
    if start.weights is None:
        model = Transformer(cfg.model).to(device)
    else:
        model = Transformer.from_state_dict(cfg.model, start.weights).to(device=device, dtype=torch.float32)
        start.weights = None
    lora = cfg.finetune.lora
    quantized = lora.enabled and lora.base_quantization != "none"
    if quantized:  # QLoRA: the task prepares on the quantized base, which is what the adapters start from
        apply_lora(model, lora)
        quantize_lora_base(model, lora.base_quantization)
    model.eval()  # e.g. DPO's reference: the starting weights, without dropout
    with lora_disabled(model) if quantized else contextlib.nullcontext():
        task.prepare(model, device, autocast)
    model.train()
    if lora.enabled and not quantized:
        apply_lora(model, lora)
    model.activation_checkpointing = cfg.train.activation_checkpointing
    model.loss_chunk_tokens = cfg.train.loss_chunk_tokens
    return model


def _forward(model: Transformer, tc: TrainConfig, env: DistEnv, sharded: bool, device: torch.device):
    """What the steps call: the model, wrapped in DDP under torchrun (FSDP2 shards the model
    itself), compiled if asked."""
    forward = model
    if env.enabled and not sharded:
        from torch.nn.parallel import DistributedDataParallel

        # Replicas start identical (DDP broadcasts rank 0's weights) and stay so: gradients
        # are averaged across ranks in backward.
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(forward) if tc.compile else forward


def _step_strategy(task: Task, forward, model: Transformer, tc: TrainConfig, env: DistEnv, sharded: bool, autocast,
                   device: torch.device, total_steps: int):
    if not tc.dp.enabled:
        return GradientStep(task, forward, model, tc, env, sharded, autocast, device)
    from bastion.train.dp import PrivateStep  # Opacus loads only for DP runs

    # DP-SGD (bastion/train/dp.py): when enabled it happens, or the run fails before step one.
    return PrivateStep(model, tc, task, forward, autocast, device, total_steps)


def _notes(cfg: BastionConfig, env: DistEnv, sharded: bool, task: Task, start: StartPoint, model: Transformer,
           total_steps: int) -> list[str]:
    tc, notes = cfg.train, []
    if env.enabled:
        notes.append(f"data-parallel ({'FSDP2' if sharded else 'DDP'}) on {env.world} ranks, global batch "
                     f"{tc.batch_size * env.world * tc.grad_accum} {task.batch_unit()}")
    notes += task.describe()
    if start.directory is not None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        notes.append(f"{tc.objective} from {start.directory}: {trainable:,} of {model.num_params():,} parameters "
                     f"trainable{' (LoRA)' if cfg.finetune.lora.enabled else ''}, {total_steps} steps")
    if cfg.finetune.lora.enabled and cfg.finetune.lora.base_quantization != "none":
        notes.append(quantized_base(model, cfg.finetune.lora.base_quantization).describe())
    return notes


def _agreed_stop(stop: StopRequest, should_stop: Callable[[int], bool] | None, step: int, env: DistEnv) -> str | None:
    """Why the run stops after this step, if it does. The request is read once: a signal
    landing after this line counts from the next step. Under torchrun only the agreed answer
    decides, so every rank stops at the same step (a rank stopping alone would leave the
    others waiting in a collective)."""
    if stop.requested is None and should_stop is not None and should_stop(step):
        stop.requested = "callback"
    stopping_by = stop.requested
    if env.enabled and any_rank(stopping_by is not None, env) and stopping_by is None:
        stopping_by = "another rank"
    return stopping_by


def _evaluate(task: Task, model: Transformer, forward, env: DistEnv, autocast, device: torch.device,
              max_batches: int) -> dict[str, float]:
    model.eval()
    try:
        # Under torchrun the bare model: each rank evaluates its rows, the task sums them.
        return task.evaluate(model if env.enabled else forward, autocast, device, max_batches)
    finally:
        model.train()


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


class _Window:
    """Training tokens and time since the last log line (tokens/s leaves out validation and
    checkpoint time)."""

    def __init__(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def tokens_per_s(self) -> float:
        elapsed = time.perf_counter() - self.start
        tps = self.tokens / elapsed if elapsed > 0 else 0.0
        self.start, self.tokens = time.perf_counter(), 0
        return tps

    @contextlib.contextmanager
    def paused(self):
        paused = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - paused
