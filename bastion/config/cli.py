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
    objective (train.objective) must be one the training loop knows, and every reward in
    rewards: must exist and take the parameters given (they are built, then closed)."""
    from bastion.train.tasks import task_class

    try:
        cfg = load(file, overrides)
        task_class(cfg.train.objective)
        _check_rewards(cfg)
    except ConfigError as exc:
        if exc.problems:
            # One complete line per problem, each naming the file and the field.
            for loc, msg in exc.problems:
                err.print(f"[bold red]error:[/] {escape(f'{file}: {loc}: {msg}')}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        raise
    out.print(f"{file}: OK")


def _check_rewards(cfg: BastionConfig) -> None:
    """Build the rewards: section (cheap: no reward loads a model or starts a process when
    built) so an unknown name or a bad parameter is a field error like rewards[1].pattern."""
    from bastion.rewards import build_reward

    problems: list[tuple[str, str]] = []
    for i, spec in enumerate(cfg.rewards):  # each one, so every bad entry is reported at once
        try:
            build_reward(spec.as_mapping(), f"rewards[{i}]")[0].close()
        except ConfigError as exc:
            problems += exc.problems or [(f"rewards[{i}]", str(exc))]
    if problems:
        raise ConfigError("; ".join(f"{loc}: {msg}" for loc, msg in problems), problems)


@app.command("show")
def config_show(
    file: Optional[Path] = typer.Argument(None, help="Config YAML file; omit to print the defaults."),
    overrides: Optional[List[str]] = SetOption,
) -> None:
    """Print the fully resolved config (defaults, ${ENV} and --set applied) with secrets redacted."""
    from bastion.config.load import to_yaml

    print(to_yaml(load(file, overrides)), end="")
