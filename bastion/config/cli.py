"""`bastion config validate|show`, and the --config / --set options every stage's command takes."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from bastion.config.schema import BastionConfig
from bastion.errors import ConfigError

app = typer.Typer(help="Check and print configs (secrets redacted).", no_args_is_help=True)
out = Console(markup=False)  # paths and names are printed as they are, never read as markup
err = Console(stderr=True)

SetOption = typer.Option(
    None, "--set", "-s", help="Override a config value, e.g. --set train.lr=3e-4 (repeatable; the field's type converts the "
    "text; [a, b] for a list, null for none)."
)
ConfigOption = typer.Option(None, "--config", "-c", help="YAML config file (see configs/). Defaults apply when omitted.")


def load(config: Optional[Path], overrides: Optional[List[str]]) -> BastionConfig:
    """The config a command runs with: the file (or the defaults), then the --set overrides."""
    from bastion.config.load import load_config

    return load_config(config, overrides or [])


@app.command("validate")
def config_validate(
    file: Path = typer.Argument(..., help="Config YAML file to check."),
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Validate a config; print every problem with its field path (exit 2 if any). The
    objective (train.objective) must be one the training loop knows."""
    from bastion.train.tasks import task_class

    try:
        task_class(load(file, overrides).train.objective)
    except ConfigError as exc:
        if exc.problems:
            # One complete line per problem, each naming the file and the field.
            for loc, msg in exc.problems:
                err.print(f"[bold red]error:[/] {escape(f'{file}: {loc}: {msg}')}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        raise
    out.print(f"{file}: OK")


@app.command("show")
def config_show(
    file: Optional[Path] = typer.Argument(None, help="Config YAML file; omit to print the defaults."),
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Print the fully resolved config (defaults, ${ENV} and --set applied) with secrets redacted."""
    from bastion.config.load import to_yaml

    print(to_yaml(load(file, overrides)), end="")
