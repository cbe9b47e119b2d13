"""`bastion train` and `bastion plot` (registered in bastion/cli.py)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from bastion.config.cli import ConfigOption, SetOption, load

out = Console(markup=False)  # paths and names are printed as they are, never read as markup


def train_cmd(
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in train.out_dir from its latest checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train or fine-tune as the config says (train.objective). Ctrl-C / SIGTERM finishes the step, saves, and exits 0.

    Under torchrun (torchrun --nproc-per-node N -m bastion.cli train -c cfg.yaml) each process
    is one data-parallel rank: train.parallel ddp or fsdp; see docs/distributed.md.
    """
    from bastion.train import train

    result = train(load(config, overrides), resume=resume, quiet=quiet)
    if os.environ.get("RANK", "0") != "0":
        return  # rank 0 reports for the run
    val = f", val loss {result.final_val_loss:.4f}{result.val_summary}" if result.final_val_loss is not None else ""
    adapter = f"; adapter {result.adapter}" if result.adapter is not None else ""
    out.print(f"step {result.steps}: train loss {result.final_train_loss:.4f}{val}; checkpoint {result.checkpoint}{adapter}",
              highlight=False, soft_wrap=True)


def plot_cmd(
    run_dir: Path = typer.Argument(..., help="Training run folder (holds metrics.jsonl)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG path (default RUN_DIR/loss.png)."),
) -> None:
    """Write a PNG of a training run's curves: loss (train and validation); reward and pass@1 too for RL runs."""
    from bastion.train.metrics import plot_run

    path = plot_run(run_dir, output)
    out.print(f"wrote {path}")
