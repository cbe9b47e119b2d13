"""A rich progress bar showing step, loss, lr, tokens/s and ETA (silent when quiet)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_steps: int, start_step: int = 0, quiet: bool = False, console: Console | None = None):
        self.quiet = quiet
        self.console = console or Console(stderr=True, markup=False)  # notes quote paths: plain text
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s{task.fields[mfu]}"),
            TimeRemainingColumn(),
            console=self.console,
            disable=quiet,
        )
        self._task = self._progress.add_task("train", total=total_steps, completed=start_step, loss="-", lr="-", tps="-",
                                              mfu="")

    def __enter__(self) -> "TrainProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, loss: float | None = None, lr: float | None = None, tokens_per_s: float | None = None,
               mfu: float | None = None) -> None:
        fields = {}
        if loss is not None:
            fields = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tps": f"{tokens_per_s:,.0f}",
                      "mfu": f"  MFU {mfu:.1%}" if mfu is not None else ""}
        self._progress.update(self._task, completed=step, **fields)

    def note(self, message: str) -> None:
        if not self.quiet:
            self._progress.console.print(message)
