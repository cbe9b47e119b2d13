"""`bastion serve keys add|list|revoke`: manage the hashed API key file of `bastion serve`."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.text import Text
from rich.markup import escape
from rich.table import Table

keys_app = typer.Typer(
    help="API keys for `bastion serve`: add (the key is shown once), list, revoke. "
         "The key file stores SHA-256 digests only and must be mode 0600.",
    no_args_is_help=True,
)
out = Console(markup=False)  # plain text; a BastionError (ConfigError) raised by a command is reported by bastion.cli (exit 2)
err = Console(stderr=True)

_KEY_FILE_HELP = "Key file (JSON, mode 0600); serve.key_file in the config. Created by the first `add`."


@keys_app.command("add")
def add_cmd(
    key_file: Path = typer.Option(..., "--key-file", help=_KEY_FILE_HELP),
    name: str = typer.Option(..., "--name", help="Who or what the key is for: 1-64 characters A-Z a-z 0-9 . _ -"),
) -> None:
    """Create a new API key and print it once. Only its SHA-256 is stored: it cannot be shown
    again (revoke it and add a new one if it is lost)."""
    from bastion.serve.keys import add_key

    kid, key = add_key(key_file, name)
    err.print(f"Added key {kid} ({escape(name)}) to {escape(str(key_file))}.")
    err.print("[bold yellow]This is the only time the key is shown; it is not stored. "
              "Copy it now into your client's secret store.[/]")
    print(key)  # plain stdout, so that `... | secret-store put` works; the notes above go to stderr


@keys_app.command("list")
def list_cmd(
    key_file: Path = typer.Option(..., "--key-file", help=_KEY_FILE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON (id, name, created, revoked)."),
) -> None:
    """List the keys of a key file: id, name, creation time, status (never the keys or digests)."""
    from bastion.serve.keys import list_keys

    keys = list_keys(key_file)
    if as_json:
        print(json.dumps(keys, indent=2))
        return
    table = Table(title=str(key_file), show_header=True)
    for col in ("id", "name", "created", "status"):
        table.add_column(col)
    for k in keys:
        table.add_row(k["id"], k["name"], k["created"], Text("revoked", style="red") if k["revoked"] else "active")
    out.print(table)
    active = sum(not k["revoked"] for k in keys)
    out.print(f"{len(keys)} keys, {active} active")


@keys_app.command("revoke")
def revoke_cmd(
    id_or_name: str = typer.Argument(..., metavar="ID_OR_NAME", help="Key id (key_xxxxxxxx) or the name of an active key."),
    key_file: Path = typer.Option(..., "--key-file", help=_KEY_FILE_HELP),
) -> None:
    """Revoke a key. A running server stops accepting it within seconds (it re-reads the file)."""
    from bastion.serve.keys import revoke_key

    kid = revoke_key(key_file, id_or_name)
    out.print(f"Revoked {kid} in {escape(str(key_file))}.")
