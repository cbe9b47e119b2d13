"""`bastion eval ...`: evaluations of trained checkpoints."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table


app = typer.Typer(help="Evaluate trained checkpoints (memorization audits).", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


@app.command("memorization")
def memorization_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint",
                                    help="Checkpoint folder, or a run/checkpoints folder (uses 'latest')."),
    canaries: Path = typer.Option(..., "--canaries", help="Records file written by `bastion data canaries`."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here (mode 0600)."),
    candidates: int = typer.Option(10_000, "--candidates", min=100, max=10_000_000,
                                   help="Sample size for estimated ranks (candidate spaces above --exact-limit)."),
    exact_limit: int = typer.Option(10_000, "--exact-limit", min=1, max=10_000_000,
                                    help="Score every candidate when there are at most this many."),
    seed: int = typer.Option(0, "--seed", help="Seed of the candidate sample (estimated ranks)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or mps."),
) -> None:
    """Exposure of each canary (The Secret Sharer): log2|R| - log2 rank of the true secret among all candidates."""
    from bastion.eval.memorization import audit_memorization
    from bastion.safeio import replace_file

    report = audit_memorization(checkpoint, canaries, sample_size=candidates, exact_limit=exact_limit,
                                seed=seed, device=device)
    table = Table(title=f"memorization: {report.checkpoint}")
    for column in ("canary", "repeats", "rank", "exposure", "max exposure", "greedy hit"):
        table.add_column(column, justify="left" if column == "canary" else "right")
    for r in report.results:
        # Estimated ranks say so; "beyond resolution" means no sampled candidate beat the secret.
        rank = f"{r.rank:,.0f}" if r.rank_exact else f"{'≤' if r.beyond_resolution else '~'}{r.rank:,.0f}"
        expo = f"{'≥' if r.beyond_resolution else ''}{r.exposure:.2f}"
        table.add_row(r.id, str(r.repeats), rank, expo, f"{r.max_exposure:.2f}", "yes" if r.greedy_hit else "no")
    out.print(table)
    estimated = [r for r in report.results if not r.rank_exact]
    if estimated:
        out.print(f"~ ranks estimated from {estimated[0].sample_size:,} sampled candidates (exact up to "
                  f"{exact_limit:,}); ≤/≥: no sampled candidate beat the secret, the sample's resolution limit")
    for repeats, mean in report.by_repeats().items():
        out.print(f"repeats {repeats}: mean exposure {mean:.2f}")
    if json_out is not None:
        try:
            replace_file(json_out, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
        except OSError as exc:
            err.print(f"[bold red]error:[/] cannot write {json_out}: {exc.strerror}", highlight=False)
            raise typer.Exit(2) from None
        out.print(f"wrote {json_out}")
