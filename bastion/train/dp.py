"""Differentially private training (DP-SGD, Abadi et al. 2016) for the one training loop.

Each step:
  1. Poisson sampling: every training block joins the batch independently with probability
     q = batch_size / n_blocks, so batch sizes vary (the RDP accountant's analysis assumes this);
  2. per-example gradients (Opacus grad-sample hooks; one example = one block of seq_len + 1 tokens);
  3. each example's gradient is clipped to L2 norm <= max_grad_norm (C), the clipped gradients are
     summed, Gaussian noise N(0, (sigma * C)^2) is added to every coordinate, and the result is
     divided by the expected batch size;
  4. the RDP accountant records (sigma, q) for the step.

Which examples are sampled and what noise is drawn both come from a per-run secret key plus the
step number. Deterministic given the key (exact resume still holds), but not derivable from
`train.seed`, which is written into every checkpoint's config.yaml: privacy amplification by
subsampling needs the batch membership to stay hidden, and the noise is only noise to someone
who cannot regenerate it. The key lives in `<run_dir>/dp_secret.key` (0600), never inside a
checkpoint, so checkpoints can be shared or pushed without it.

Nothing falls back: a layer without a vetted per-example gradient rule, a batch-mixing layer,
or a setting that would break the accounting is a ConfigError before the first step.
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import secrets
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleHooks, register_grad_sampler

from bastion.config.schema import TrainConfig
from bastion.errors import CheckpointError, ConfigError
from bastion.model.transformer import RMSNorm
from bastion.safeio import read_text_limited, write_bytes

KEY_FILE = "dp_secret.key"
KEY_BYTES = 32
# Opacus' default RDP orders plus larger ones: with little noise the optimum lies above 63, and a
# missing order only makes the reported epsilon looser (never smaller than the truth).
ALPHAS: list[float] = [*RDPAccountant.DEFAULT_ALPHAS, 80, 96, 128, 192, 256, 512, 1024]
# Layers that mix examples within a batch: one example's data would leak into the others'
# gradients, so per-example clipping no longer bounds its influence.
BATCH_MIXING = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)

# Embedding inputs are token ids (no grad), which makes torch warn on every backward; harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


@register_grad_sampler(RMSNorm)
def rmsnorm_grad_sample(layer: RMSNorm, activations: list[torch.Tensor],
                        backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient of our RMSNorm's weight: y = weight * normed(x), so dL/dweight for
    example n is sum over positions of normed(x) * dL/dy. Recomputes normed(x) exactly as
    RMSNorm.forward does (float32, then cast back)."""
    x = activations[0]
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + layer.eps)).to(x.dtype)
    grad = normed.to(backprops.dtype) * backprops
    return {layer.weight: grad.reshape(grad.size(0), -1, grad.size(-1)).sum(1)}


def check_supported(model: nn.Module) -> None:
    """Refuse models DP-SGD cannot handle correctly, naming the module. Allowed: layers whose
    own trainable parameters have a registered per-example gradient rule (Opacus' vetted ones,
    plus RMSNorm above). Opacus would run anything else through a generic functorch path that
    assumes examples are processed independently; we cannot check that, so we refuse."""
    for name, module in model.named_modules():
        where = f"{name or 'the model'} ({type(module).__module__}.{type(module).__qualname__})"
        if isinstance(module, BATCH_MIXING):
            raise ConfigError(f"train.dp: {where} mixes examples within a batch, which breaks per-example privacy; "
                              "replace it (e.g. with GroupNorm/LayerNorm) to train with DP")
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and type(module) not in GradSampleHooks.GRAD_SAMPLERS:
            raise ConfigError(f"train.dp: layer {where} has no per-example gradient rule, so DP-SGD cannot bound "
                              "its gradients; refusing to train it (register an opacus grad sampler for it)")
        if own and any(True for _ in module.buffers(recurse=False)):
            raise ConfigError(f"train.dp: layer {where} has trainable parameters and buffers (state shared across "
                              "examples); DP-SGD does not support it")


def _derive_seed(key: bytes, purpose: bytes, step: int) -> int:
    """63-bit seed for one step's sampling or noise, unpredictable without the key."""
    digest = hashlib.sha256(key + b"\0" + purpose + b"\0" + step.to_bytes(8, "little")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@functools.lru_cache(maxsize=64)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    """RDP of one subsampled Gaussian step at each order in ALPHAS. RDP composes additively, so
    a history's RDP is sum(steps * this): the same sum Opacus' RDPAccountant.get_epsilon forms,
    but computed once per (sigma, q) instead of on every call (~0.1 s each)."""
    return tuple(rdp_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=ALPHAS))


def _epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """(epsilon, delta)-DP spent by `history` [(sigma, q, steps), ...] under the RDP accountant."""
    if not history:
        return 0.0
    rdp = sum(steps * np.asarray(_rdp_per_step(sigma, q)) for sigma, q, steps in history)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        eps, _ = rdp_analysis.get_privacy_spent(orders=ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


class PrivateTraining:
    """DP-SGD state for one run: sampling, clipping + noise, accounting. `PrivateStep` (below)
    drives it for the training loop:

        dp = PrivateTraining(model, tc, n_examples=..., total_steps=...)   # before the first step
        dp.start(run_dir, step)             # secret key; refuses a plan that overspends epsilon
        blocks = dp.sample(step)            # Poisson batch for this step (may be empty)
        ... forward + loss.backward() on those blocks (skip when empty) ...
        dp.privatize(step, len(blocks))     # replaces p.grad by the noised, clipped mean
        optimizer.step()
    """

    def __init__(self, model: nn.Module, tc: TrainConfig, *, n_examples: int, total_steps: int):
        cfg = tc.dp
        if tc.compile:
            raise ConfigError("train.dp with train.compile is not supported: per-example gradient hooks do not survive "
                              "torch.compile reliably; set train.compile: false")
        if tc.grad_accum != 1:
            raise ConfigError("train.dp needs train.grad_accum: 1: a Poisson-sampled batch is one logical batch; "
                              "raise train.batch_size instead")
        if not cfg.poisson_sampling:
            raise ConfigError("train.dp.poisson_sampling: false is not supported: the RDP accountant's epsilon is only "
                              "valid for Poisson-sampled batches")
        if tc.batch_size >= n_examples:
            raise ConfigError(f"train.dp: batch_size ({tc.batch_size}) must be smaller than the number of training "
                              f"blocks ({n_examples}) for subsampled DP-SGD; add data or lower train.batch_size")
        check_supported(model)
        self.params = [p for p in model.parameters() if p.requires_grad]  # a tied weight appears once
        self.n_examples = n_examples
        self.expected_batch = tc.batch_size
        self.sample_rate = tc.batch_size / n_examples
        self.max_grad_norm = cfg.max_grad_norm
        self.target_epsilon = cfg.target_epsilon
        self.delta = cfg.delta if cfg.delta is not None else 1.0 / n_examples
        self.total_steps = total_steps
        self.skipped_grad_clip = tc.grad_clip is not None
        self.explicit_noise = cfg.noise_multiplier is not None
        if cfg.noise_multiplier is not None:
            self.noise_multiplier = cfg.noise_multiplier
        else:
            try:
                self.noise_multiplier = get_noise_multiplier(
                    target_epsilon=cfg.target_epsilon, target_delta=self.delta, sample_rate=self.sample_rate,
                    steps=total_steps, accountant="rdp", alphas=ALPHAS)
            except ValueError as exc:
                raise ConfigError(f"train.dp: cannot reach target_epsilon {cfg.target_epsilon} in {total_steps} steps "
                                  f"({exc})") from None
        self.history: list[tuple[float, float, int]] = []
        self.key: bytes | None = None
        # loss_reduction="mean": the model's loss is a mean over the batch, so Opacus scales the
        # backprops by the batch size to recover each example's own gradient.
        self.hooks = GradSampleHooks(model, batch_first=True, loss_reduction="mean", strict=True)

    # ---- key, budget ---------------------------------------------------------------
    def start(self, run_dir: Path, step: int) -> list[str]:
        """Check the remaining plan fits the budget, then load (or create) the run's secret key.
        Returns notes for the progress output."""
        remaining = self.total_steps - step
        planned = self.history + ([(self.noise_multiplier, self.sample_rate, remaining)] if remaining > 0 else [])
        projected = _epsilon(planned, self.delta)
        if projected > self.target_epsilon:
            raise ConfigError(
                f"train.dp: the planned run would spend epsilon {projected:.3f} > target_epsilon {self.target_epsilon} "
                f"(noise_multiplier {self.noise_multiplier:.4f}, sample rate {self.sample_rate:.3g}, "
                f"{self.total_steps} steps in all); raise the noise, shorten the run, or raise the target")
        notes = []
        path = run_dir / KEY_FILE
        if path.exists() or path.is_symlink():
            text = read_text_limited(path, 1024, ConfigError, "DP key").strip()  # refuses symlinks
            if path.stat().st_mode & 0o077:
                raise ConfigError(f"{path}: permissions {path.stat().st_mode & 0o777:04o} are too open for the secret "
                                  "key that hides DP batches and noise; chmod 600 it (or delete it for a fresh key)")
            try:
                self.key = bytes.fromhex(text)
            except ValueError:
                self.key = b""
            if len(self.key) != KEY_BYTES:
                raise ConfigError(f"{path}: not a {KEY_BYTES}-byte hex key; delete it to start with a fresh key")
        else:
            if step > 0:
                notes.append(f"[warning] {path} is missing: resuming with a new secret key, so batches and noise "
                             "differ from the original run from here on (privacy is unaffected)")
            self.key = secrets.token_bytes(KEY_BYTES)
            write_bytes(path, (self.key.hex() + "\n").encode())
            os.chmod(path, 0o600)
        if self.skipped_grad_clip:
            notes.append("DP-SGD: train.grad_clip is not applied; per-example clipping to "
                         "train.dp.max_grad_norm replaces it")
        notes.append(f"DP-SGD: noise multiplier {self.noise_multiplier:.4f}, clip {self.max_grad_norm}, sample rate "
                     f"{self.sample_rate:.4g} of {self.n_examples} blocks, delta {self.delta:.3g}; "
                     f"epsilon {self.epsilon():.3f} spent, {projected:.3f} at step {self.total_steps} "
                     f"(target {self.target_epsilon})")
        return notes

    def epsilon(self) -> float:
        return _epsilon(self.history, self.delta)

    # ---- one step ------------------------------------------------------------------
    def sample(self, step: int) -> list[int]:
        """This step's Poisson batch, sorted block ids. Drawn as k ~ Binomial(n, q) then a uniform
        k-subset, which is the same distribution as n independent coin flips, in O(k) memory."""
        assert self.key is not None, "call start() first"
        rng = np.random.default_rng(_derive_seed(self.key, b"sample", step))
        k = int(rng.binomial(self.n_examples, self.sample_rate))
        return sorted(int(b) for b in rng.choice(self.n_examples, size=k, replace=False, shuffle=False))

    @torch.no_grad()
    def privatize(self, step: int, batch_size: int) -> None:
        """After backward on this step's batch: set each p.grad to
        (sum of per-example gradients clipped to max_grad_norm + N(0, (sigma*C)^2)) / expected batch."""
        assert self.key is not None, "call start() first"
        grads = []
        for p in self.params:
            gs = getattr(p, "grad_sample", None)
            if isinstance(gs, list):  # two backwards without privatize in between
                raise RuntimeError("DP-SGD: gradients of several batches were accumulated; one backward per step")
            if batch_size and gs is None and p.grad is not None:
                raise RuntimeError(f"DP-SGD: no per-example gradient was captured for a parameter of shape "
                                   f"{tuple(p.shape)}; refusing to apply a non-private gradient")
            if gs is not None and gs.size(0) != batch_size:
                raise RuntimeError(f"DP-SGD: per-example gradients hold {gs.size(0)} examples, the batch {batch_size}")
            grads.append(gs)
        if batch_size:
            sq = torch.zeros(batch_size, device=self.params[0].device, dtype=torch.float32)
            for gs in grads:
                if gs is not None:
                    sq += gs.reshape(batch_size, -1).float().pow(2).sum(1)
            # Opacus' rule: scale each example by min(1, C / (norm + 1e-6)).
            factor = (self.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        device = self.params[0].device
        generator = torch.Generator(device=device)
        generator.manual_seed(_derive_seed(self.key, b"noise", step))
        std = self.noise_multiplier * self.max_grad_norm
        for p, gs in zip(self.params, grads):
            total = torch.zeros(p.shape, device=device, dtype=torch.float32)
            if batch_size and gs is not None:
                total += torch.einsum("n,n...->...", factor, gs.float())
            total += torch.normal(0.0, std, size=tuple(p.shape), generator=generator, device=device)
            p.grad = (total / self.expected_batch).to(p.dtype)
            p.grad_sample = None
        self.history = self._stepped(self.history)

    def _stepped(self, history: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
        """`history` plus one step at (sigma, q), merged into the last entry as Opacus does."""
        if history and history[-1][:2] == (self.noise_multiplier, self.sample_rate):
            return [*history[:-1], (self.noise_multiplier, self.sample_rate, history[-1][2] + 1)]
        return [*history, (self.noise_multiplier, self.sample_rate, 1)]

    # ---- checkpoint ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What trainer_state.json keeps: the accountant's history and the plan (never the key)."""
        return {
            "accountant": "rdp",
            "history": [[sigma, q, steps] for sigma, q, steps in self.history],
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "max_grad_norm": self.max_grad_norm,
            "target_epsilon": self.target_epsilon,
            "epsilon": self.epsilon(),
        }

    def load_state_dict(self, state: Any, step: int) -> None:
        try:
            history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
            saved_sigma = float(state["noise_multiplier"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError("trainer_state.json: malformed 'dp' accountant state") from None
        if sum(n for _, _, n in history) != step:
            raise CheckpointError(f"trainer_state.json: the DP accountant counts {sum(n for _, _, n in history)} "
                                  f"steps, the checkpoint is at step {step}")
        if not all(math.isfinite(s) and s > 0 and 0 < q <= 1 for s, q, _ in history):
            raise CheckpointError("trainer_state.json: invalid DP accountant history")
        self.history = history
        # Keep the noise the run started with (unless train.dp.noise_multiplier is set now): a
        # changed max_steps must not silently re-derive a different sigma mid-run.
        if not self.explicit_noise:
            self.noise_multiplier = saved_sigma


class PrivateStep:
    """The training loop's step strategy under DP-SGD (see bastion/train/steps.py): the task's
    loss on this step's Poisson batch, then `privatize`. Only tasks with `supports_dp`."""

    def __init__(self, model: nn.Module, tc: TrainConfig, task: Any, forward: Any, autocast: Any,
                 device: torch.device, total_steps: int):
        if not task.supports_dp:
            raise ConfigError(f"train.dp (DP-SGD) is not available for train.objective {task.objective}")
        self.dp = PrivateTraining(model, tc, n_examples=task.n_examples, total_steps=total_steps)
        self.task, self.forward, self.autocast, self.device = task, forward, autocast, device

    def __call__(self, step: int) -> tuple[torch.Tensor, int, dict[str, torch.Tensor]]:
        # A Poisson batch of varying size (possibly empty: then the step is noise only).
        examples = self.dp.sample(step)
        with self.autocast():
            loss, tokens = self.task.examples_loss(self.forward, examples, self.device)
        if loss is None:
            loss = torch.full((), math.nan, device=self.device)  # no tokens: the loop does not count it
        else:
            loss.backward()
        self.dp.privatize(step, len(examples))  # per-example clip + noise replace the gradients
        return loss.detach(), tokens, {}

    def start(self, run_dir: Path, step: int) -> list[str]:
        return self.dp.start(run_dir, step)

    def epochs(self, step: int) -> float:
        return step * self.dp.sample_rate

    def log_values(self, stats: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"epsilon": self.dp.epsilon()}

    def summary(self) -> str:
        return f", epsilon {self.dp.epsilon():.3f} (delta {self.dp.delta:.3g})"

    def epsilon(self) -> float | None:
        return self.dp.epsilon()

    def checkpoint_state(self) -> dict[str, Any]:
        return {"dp": self.dp.state_dict()}

    def restore(self, state: dict[str, Any], step: int) -> None:
        if "dp" not in state:
            raise CheckpointError("--resume: train.dp.enabled is set but the checkpoint was trained without DP; "
                                  "steps already taken are not private, so start a new run")
        self.dp.load_state_dict(state["dp"], step)
