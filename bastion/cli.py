"""The `bastion` command: one subcommand per stage of the pipeline."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup
from rich.table import Table

from bastion.checkpoint.cli import app as ckpt_app
from bastion.errors import BastionError, ConfigError
from bastion.eval.cli import app as eval_app
from bastion.export.cli import export_app, import_app
from bastion.serve.cli import serve_app

err = Console(stderr=True)


class _BastionGroup(TyperGroup):
    """Every command's BastionError (bad config, data, checkpoint, limit...) becomes one red
    line on stderr and exit status 2 - never a traceback - so commands need no try/except."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BastionError as exc:
            # escape: messages quote paths and user text, which rich would read as markup
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_BastionGroup,
    help="Bastion: raw text to a trained, sampled language model, secure by default.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Check and print configs (secrets redacted).", no_args_is_help=True)
data_app = typer.Typer(help="Prepare training data: read, clean, tokenize, pack shards.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(ckpt_app, name="ckpt")
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(import_app, name="import")
app.add_typer(export_app, name="export")
app.add_typer(serve_app, name="serve")

out = Console(markup=False)  # paths and names are printed as they are, never read as markup

SetOption = typer.Option(
    None, "--set", "-s", help="Override a config value, e.g. --set train.lr=3e-4 (repeatable; YAML scalar values)."
)
ConfigOption = typer.Option(None, "--config", "-c", help="YAML config file (see configs/). Defaults apply when omitted.")


def _load(config: Optional[Path], overrides: Optional[List[str]]):
    from bastion.config import load_config

    return load_config(config, overrides or [])


@config_app.command("validate")
def config_validate(
    file: Path = typer.Argument(..., help="Config YAML file to check."),
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Validate a config; print every problem with its field path (exit 2 if any)."""
    try:
        _load(file, overrides)
    except ConfigError as exc:
        if exc.problems:
            err.print(f"[bold red]{escape(str(file))}: {len(exc.problems)} problem(s)[/]")
            for loc, msg in exc.problems:
                err.print(f"  {loc}: {msg}", markup=False, highlight=False)
            raise typer.Exit(2) from None
        raise
    out.print(f"{file}: OK")


@config_app.command("show")
def config_show(
    file: Optional[Path] = typer.Argument(None, help="Config YAML file; omit to print the defaults."),
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Print the fully resolved config (defaults, ${ENV} and --set applied) with secrets redacted."""
    from bastion.config import to_yaml

    cfg = _load(file, overrides)
    print(to_yaml(cfg), end="")


@data_app.command("prepare")
def data_prepare(
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = SetOption,
    source: Optional[List[str]] = typer.Option(
        None, "--source", help="File, folder or glob of .txt/.md/.jsonl/.parquet, plain or in .gz/.zst/.zip (repeatable; replaces data.sources; must lie inside data.allowed_roots)."
    ),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (replaces data.output_dir)."),
) -> None:
    """Read sources, filter, redact PII/secrets, drop duplicates and near-duplicates, split,
    train/load a BPE tokenizer, write token shards. Prints the data report."""
    from bastion.data import prepare_dataset

    cfg = _load(config, overrides)
    updates = {}
    if source:
        updates["sources"] = list(source)
    if output:
        updates["output_dir"] = str(output)
    data_cfg = cfg.data.model_copy(update=updates)
    if not data_cfg.sources:
        raise ConfigError("no data sources: set data.sources in the config or pass --source")
    with err.status("preparing data...") as status:
        report = prepare_dataset(data_cfg, on_progress=lambda stage, n: status.update(f"{stage}: {n:,}"))
    print_report(report)
    out.print(f"dataset written to {data_cfg.output_dir}")


@data_app.command("canaries")
def data_canaries(
    data_dir: Path = typer.Argument(..., help="Prepared dataset folder (holds index.json) to plant canaries in."),
    records: Path = typer.Option(..., "--out", help="Where to write the secrets (0600; must be outside DATA_DIR; never overwritten)."),
    repeats: List[int] = typer.Option([1, 10, 100], "--repeats", min=1, help="Times each canary is inserted (repeatable)."),
    per_repeat: int = typer.Option(2, "--per-repeat", min=1, help="Canaries per repetition count."),
    seed: int = typer.Option(0, "--seed", help="Seed for the canary documents' order (secrets come from the OS CSPRNG)."),
    fmt: str = typer.Option("my PIN is {secret}", "--format", help="Canary text; {secret} marks the random digits."),
    digits: int = typer.Option(6, "--digits", min=1, max=18, help="Digits per secret: 10^digits candidates."),
) -> None:
    """Plant random-secret canaries in a prepared dataset (as a new train shard) to audit memorization later."""
    from bastion.data.canaries import insert_canaries

    done = insert_canaries(data_dir, records, fmt=fmt, digits=digits, repeats=list(repeats),
                           per_repeat=per_repeat, seed=seed)
    out.print(f"{len(done.canaries)} canaries, {done.documents:,} documents ({done.tokens:,} tokens) added to "
              f"{data_dir} as {done.shard}; secrets in {done.records} (keep it private)")


def print_report(report) -> None:
    table = Table(title="data report", show_header=False)
    for key, value in _report_items(report):
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        table.add_row(key, shown)
    out.print(table)


def _report_items(report) -> list[tuple[str, object]]:
    from dataclasses import asdict, is_dataclass

    def flatten(node, prefix=""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from flatten(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], node

    return list(flatten(asdict(report) if is_dataclass(report) else dict(report)))


@app.command("train")
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

    cfg = _load(config, overrides)
    result = train(cfg, resume=resume, quiet=quiet)
    if os.environ.get("RANK", "0") != "0":
        return  # rank 0 reports for the run
    val = f", val loss {result.final_val_loss:.4f}" if result.final_val_loss is not None else ""
    if "reward_accuracy" in result.val_metrics:
        val += f", val reward accuracy {result.val_metrics['reward_accuracy']:.3f}"
    adapter = f"; adapter {result.adapter}" if result.adapter is not None else ""
    out.print(f"step {result.steps}: train loss {result.final_train_loss:.4f}{val}; checkpoint {result.checkpoint}{adapter}",
              highlight=False, soft_wrap=True)


@app.command("generate")
def generate_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Checkpoint folder, or a run/checkpoints folder (uses 'latest')."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens to generate (default generate.max_new_tokens; above the ceiling is an error)."),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy; higher = more random."),
    top_k: Optional[int] = typer.Option(None, help="Sample only among the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling: smallest set with this total probability."),
    seed: Optional[int] = typer.Option(None, help="Random seed for reproducible sampling."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop when this string appears (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Send the prompt as a user message through the model's chat "
                              "template and stop at its end of turn (fine-tuned / imported chat models)."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the SHA-256 manifest check (not recommended)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Continue a prompt (or answer it, with --chat) with a trained checkpoint (verified before loading)."""
    from bastion.infer import generate
    from bastion.infer.loading import load_for_inference

    loaded = load_for_inference(checkpoint, verify=not no_verify)
    model_input, stop_ids = prompt, None
    if chat:
        model_input = loaded.chat.encode_prompt([{"role": "user", "content": prompt}])
        stop_ids = loaded.chat.stop_ids
    result = generate(
        loaded.model, loaded.tokenizer, model_input, limits=loaded.config.generate,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
        stop_ids=stop_ids,
    )
    if as_json:
        print(json.dumps({"prompt": prompt, "completion": result.text, "finish_reason": result.finish_reason,
                          "prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids)}))
    else:
        sys.stdout.write((result.text if chat else prompt + result.text) + "\n")


@app.command("merge")
def merge_cmd(
    base: Path = typer.Argument(..., help="The base checkpoint the adapters were trained on (finetune.init_from)."),
    adapter: Path = typer.Argument(..., help="An adapter folder (RUN/adapter) or a LoRA run / checkpoint folder."),
    out_dir: Path = typer.Argument(..., help="New folder for the merged checkpoint."),
) -> None:
    """Fold LoRA adapters into their base: a normal checkpoint (export, serve, fine-tune again).
    Refuses adapters trained on a different base (checked by MANIFEST.json hash)."""
    from bastion.model.lora import merge_checkpoint

    path = merge_checkpoint(base, adapter, out_dir)
    out.print(f"merged {adapter} into {base} -> {path}", highlight=False)


@app.command("plot")
def plot_cmd(
    run_dir: Path = typer.Argument(..., help="Training run folder (holds metrics.jsonl)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="PNG path (default RUN_DIR/loss.png)."),
) -> None:
    """Write a PNG loss curve (train and validation) for a training run."""
    from bastion.train.metrics import plot_run

    path = plot_run(run_dir, output)
    out.print(f"wrote {path}")


@app.command("demo")
def demo_cmd(
    out_dir: Path = typer.Option(Path("runs/demo"), "--out", help="Folder for the dataset, run and checkpoints (replaced)."),
    steps: int = typer.Option(600, help="Optimizer steps (about 3-4 minutes on 2 CPU cores at the default)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Prepare the Python standard library's sources, train a small model, sample from it."""
    from bastion.demo import run_demo

    run_demo(out_dir, steps=steps, quiet=quiet, console=out)


if __name__ == "__main__":
    app()
