"""Training metrics: one JSON object per line in metrics.jsonl, mirrored to TensorBoard."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from bastion.safeio import parse_json

METRICS_FILE = "metrics.jsonl"
MAX_LINE_BYTES = 64 * 2**10  # our records are ~300 bytes; longer lines are not ours


class MetricsLogger:
    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.path = run_dir / METRICS_FILE
        if resume_step is not None:
            truncate_after(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(logdir=str(run_dir / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, kind: str, step: int, **values: float) -> None:
        record = {"kind": kind, "step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(f"{kind}/{name}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


class NoMetrics:
    """What ranks other than 0 log to: nothing (rank 0 writes metrics.jsonl and TensorBoard)."""

    def log(self, kind: str, step: int, **values: float) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    with open(path, "rb") as fh:  # streamed, lines cut at 64 KiB: a hostile file is never held whole
        for line in iter(lambda: fh.readline(MAX_LINE_BYTES), b""):
            try:
                record = parse_json(line, ValueError, str(path))
            except ValueError:
                continue  # a line cut short by a crash (or not ours)
            if isinstance(record, dict):
                records.append(record)
    return records


def truncate_after(path: Path, step: int) -> None:
    """Drop records logged after `step`: a resumed run re-does those steps."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")


# RL runs (objective grpo) also log these; `plot_run` draws them in a second panel.
REWARD_SERIES = (("train", "reward", "-", "train reward (sampled)"), ("val", "reward", "s-", "val reward"),
                 ("val", "pass@1", "o-", "val pass@1"))


def _series(records: list[dict[str, Any]], kind: str, name: str) -> list[tuple[float, float]]:
    """(step, value) of one metric of one kind; records where either is not a number are skipped."""
    return [(r["step"], r[name]) for r in records if r.get("kind") == kind
            and all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) for k in ("step", name))]


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write a PNG of a run directory's curves against step: train and validation loss, and,
    when the run logged them (GRPO), a second panel of train reward and validation
    reward / pass@1. A loss-only run gets the single loss panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bastion.errors import BastionError

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    if not records:
        raise BastionError(f"{run_dir / METRICS_FILE}: no metrics to plot (is this a training run directory?)")
    output = Path(output) if output else run_dir / "loss.png"
    rewards = [(_series(records, kind, name), style, label) for kind, name, style, label in REWARD_SERIES]
    rewards = [(points, style, label) for points, style, label in rewards if points]
    if rewards:
        fig, (ax, reward_ax) = plt.subplots(2, 1, figsize=(8, 7.5), dpi=110, sharex=True)
    else:
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for kind, style in (("train", "-"), ("val", "o-")):
        points = _series(records, kind, "loss")
        if points:
            steps, losses = zip(*points)
            ax.plot(steps, losses, style, label=f"{kind} loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)" if not rewards else "loss")
    ax.set_title(f"Bastion run: {run_dir.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    if rewards:
        for points, style, label in rewards:
            steps, values = zip(*points)
            reward_ax.plot(steps, values, style, label=label, markersize=3)
        reward_ax.set_xlabel("step")
        reward_ax.set_ylabel("reward / pass@1")
        reward_ax.grid(alpha=0.3)
        reward_ax.legend()
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
    return output


# Dense bf16 peak FLOP/s per GPU, by substring of torch.cuda.get_device_name() (vendor specs).
# More specific names come first (the first substring that matches wins).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10G": 70e12,
                   "4090": 165e12, "3090": 71e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, when it is a GPU this table knows (MFU is reported then)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
