"""The `bastion` command: one subcommand per stage of the pipeline, each defined in its
stage's own cli.py (bastion/<stage>/cli.py); this module only assembles them."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from bastion.adapters.cli import merge_cmd
from bastion.checkpoint.cli import app as ckpt_app
from bastion.config.cli import app as config_app
from bastion.config.load import redact_seen_secrets
from bastion.data.cli import app as data_app
from bastion.errors import BastionError
from bastion.eval.cli import app as eval_app, predict_cmd
from bastion.infer.cli import generate_cmd, quantize_cmd
from bastion.interop.cli import export_app, import_app, publish_cmd
from bastion.serve.cli import serve_app
from bastion.train.cli import plot_cmd, train_cmd

err = Console(stderr=True)
out = Console(markup=False)  # paths and names are printed as they are, never read as markup


def one_line(message: str) -> str:
    """A message as one line: a report that lists several problems (one per line) is joined
    with "; ", so a refusal is always exactly one line however it was worded."""
    parts = [part.strip() for part in message.splitlines() if part.strip()]
    return parts[0] + "".join((" " if parts[0].endswith(":") and i == 1 else "; ") + p
                              for i, p in enumerate(parts[1:], start=1)) if parts else message


class _BastionGroup(TyperGroup):
    """Every command's BastionError (bad config, data, checkpoint, limit...) and every OSError
    (a missing folder, no permission, a full disk) becomes one red line on stderr and exit
    status 2 - never a traceback - so commands need no try/except."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BastionError as exc:
            # escape: messages quote paths and user text, which rich would read as markup
            message = redact_seen_secrets(one_line(str(exc)))
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as exc:  # the machine said no (a missing folder, permissions, a full disk)
            where = f": {exc.filename}" if exc.filename else ""
            message = redact_seen_secrets(one_line(f"{exc.strerror or exc}{where}"))
            err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_BastionGroup,
    help="Bastion: raw text to a trained, sampled language model, secure by default.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.command("train")(train_cmd)
app.command("plot")(plot_cmd)
app.command("generate")(generate_cmd)
app.command("merge")(merge_cmd)
app.command("quantize")(quantize_cmd)
app.command("predict")(predict_cmd)
app.add_typer(eval_app, name="eval")
app.add_typer(ckpt_app, name="ckpt")
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")
app.command("publish")(publish_cmd)
app.add_typer(serve_app, name="serve")


@app.command("demo")
def demo_cmd(
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for the data, runs and checkpoints (replaced; "
                                           "default runs/demo, or runs/demo-rl with --rl)."),
    steps: Optional[int] = typer.Option(None, min=1, max=1_000_000, help="Optimizer steps of the training run (default "
                                        "600, about 3-4 minutes on 2 CPU cores); with --rl, of the GRPO stage only "
                                        "(default 300; pretraining and SFT keep their fixed sizes)."),
    rl: bool = typer.Option(False, "--rl", help="The RL demo instead: pretrain and SFT a small model on synthetic "
                            "addition, then GRPO with an exact-match reward; held-out accuracy before and after."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Prepare the Python standard library's sources, train a small model, sample from it
    (--rl: show reinforcement learning raise held-out accuracy on synthetic addition)."""
    if rl:
        from bastion.demo_rl import RLDemoSize, run_rl_demo

        run_rl_demo(out_dir or Path("runs/demo-rl"), RLDemoSize.full(grpo_steps=steps), quiet=quiet, console=out)
        return
    from bastion.demo import run_demo

    run_demo(out_dir or Path("runs/demo"), steps=steps or 600, quiet=quiet, console=out)


if __name__ == "__main__":
    app()
