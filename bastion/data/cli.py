"""`bastion data prepare|canaries` (registered in bastion/cli.py)."""
from __future__ import annotations

from dataclasses import asdict, is_dataclass
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from bastion.config.cli import ConfigOption, SetOption, load
from bastion.errors import ConfigError

class EngineName(str, Enum):
    """data.engine's values, as --engine choices."""

    local = "local"
    datatrove = "datatrove"


app = typer.Typer(help="Prepare training data: read, clean, tokenize, pack shards.", no_args_is_help=True)
out = Console(markup=False)  # paths and names are printed as they are, never read as markup
err = Console(stderr=True)


@app.command("prepare")
def data_prepare(
    config: Optional[Path] = ConfigOption,
    overrides: Optional[List[str]] = SetOption,
    source: Optional[List[str]] = typer.Option(
        None, "--source", help="File, folder or glob of .txt/.md/.jsonl/.parquet, plain or in .gz/.zst/.zip (repeatable; replaces data.sources; must lie inside data.allowed_roots)."
    ),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Output folder (replaces data.output_dir)."),
    workers: Optional[int] = typer.Option(
        None, "--workers", "-w", min=1, max=256,
        help="Processes for hygiene and tokenization (replaces data.workers); the shards are byte-identical for any number.",
    ),
    engine: Optional[EngineName] = typer.Option(
        None, "--engine",
        help="Where the per-document steps run (replaces data.engine): 'local' processes, or 'datatrove' tasks "
             "(needs the datatrove extra; data.tasks sets the task count). Same shards either way.",
    ),
) -> None:
    """Read sources, filter, redact PII/secrets, drop duplicates and near-duplicates, split,
    train/load a BPE tokenizer, write token shards. Prints the data report."""
    from bastion.data import prepare_dataset

    cfg = load(config, overrides)
    updates: dict[str, Any] = {}
    if source:
        updates["sources"] = list(source)
    if output:
        updates["output_dir"] = str(output)
    if workers is not None:
        updates["workers"] = workers
    if engine is not None:
        updates["engine"] = engine.value
    data_cfg = cfg.data.model_copy(update=updates)
    if not data_cfg.sources:
        raise ConfigError("no data sources: set data.sources in the config or pass --source")
    with err.status("preparing data...") as status:
        report = prepare_dataset(data_cfg, on_progress=lambda stage, n: status.update(f"{stage}: {n:,}"))
    print_report(report)
    out.print(f"dataset written to {data_cfg.output_dir}")


@app.command("canaries")
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


def print_report(report: Any, console: Console = out) -> None:
    """The data report (`bastion data prepare`, `bastion demo`) as a two-column table."""
    table = Table(title="data report", show_header=False)
    for key, value in _report_items(report):
        shown = f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)
        table.add_row(key, shown)
    console.print(table)


def _report_items(report: Any) -> list[tuple[str, object]]:
    def flatten(node: Any, prefix: str = ""):
        if isinstance(node, dict):
            for key, value in node.items():
                yield from flatten(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], node

    return list(flatten(asdict(report) if is_dataclass(report) else dict(report)))
