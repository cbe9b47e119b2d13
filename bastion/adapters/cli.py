"""`bastion merge BASE ADAPTER OUT` (registered in bastion/cli.py)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from bastion.checkpoint.cli import RequireSignatureOption, TrustedKeyOption, use_signature_options

out = Console(markup=False)  # paths and names are printed as they are, never read as markup


def merge_cmd(
    base: Path = typer.Argument(..., help="The base checkpoint the adapters were trained on (finetune.init_from)."),
    adapter: Path = typer.Argument(..., help="An adapter folder (RUN/adapter) or a LoRA run / checkpoint folder."),
    out_dir: Path = typer.Argument(..., help="New folder for the merged checkpoint."),
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Fold LoRA adapters into their base: a normal checkpoint (export, serve, fine-tune again).
    Refuses adapters trained on a different base (checked by MANIFEST.json hash)."""
    from bastion.adapters.merge import merge_checkpoint

    use_signature_options(require_signature, trusted_keys)
    path = merge_checkpoint(base, adapter, out_dir)
    out.print(f"merged {adapter} into {base} -> {path}", highlight=False)
