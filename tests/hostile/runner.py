"""Run classes of the hostile corpus through the real CLI, in this process, and report.

    python tests/hostile/runner.py CORPUS_DIR CLASS[,CLASS...]
        -> per class: one JSON object per command on stdout, then {"class": K, "peak_rss_bytes": ...}

In a process of its own (started by test_hostile_cli.py) so that a native crash is seen as
one. The classes share it (one start of Python, torch and the CLI's imports instead of one per
class); each class's peak memory is measured from its own start: the kernel's high-water mark
is reset between classes (/proc/self/clear_refs), so a class is charged what is resident while
it runs, what earlier classes left allocated included (never less than it would use alone).
Each command runs through typer's CliRunner (the same root group `bastion` uses); what it
printed, its exit status and any exception that escaped are reported, with every file it left
outside {out}.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from corpus import SENTINEL_NAME, Base, cases  # noqa: E402


def _tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def _fill(arg: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        arg = arg.replace("{" + key + "}", value)
    return arg


def main(corpus: Path, classes: list[int]) -> None:
    from typer.testing import CliRunner

    from bastion.cli import app

    base = Base(**json.loads((corpus / "base.json").read_text()))
    runner = CliRunner()
    for klass in classes:
        _reset_peak_rss()
        run_class(corpus, klass, base, runner, app)
        print(json.dumps({"class": klass, "peak_rss_bytes": _peak_rss_bytes()}), flush=True)


def run_class(corpus: Path, klass: int, base: Base, runner, app) -> None:
    for case in cases(corpus / SENTINEL_NAME):
        if case.klass != klass:
            continue
        folder = corpus / str(case.klass) / case.name
        for i, command in enumerate(case.commands):
            out = corpus / "outputs" / f"{case.name}-{i}"
            values = {"case": str(folder), "out": str(out), "chat": str(base.chat), "adapter": str(base.adapter),
                      "base_ckpt": str(base.ckpt)}
            args = [_fill(a, values) for a in command]
            print(f"running {case.name}: {' '.join(command)}", file=sys.stderr, flush=True)
            before = _tree(corpus)
            start = time.perf_counter()
            result = runner.invoke(app, args, env={"COLUMNS": "400", **case.env}, catch_exceptions=True)
            seconds = time.perf_counter() - start
            escaped = None
            if result.exception is not None and not isinstance(result.exception, SystemExit):
                escaped = "".join(traceback.format_exception(result.exception))
            left = sorted(p for p in _tree(corpus) - before if not p.startswith(str(out)))
            print(json.dumps({"case": case.name, "class": case.klass, "command": command, "args": args,
                              "exit_code": result.exit_code, "seconds": seconds, "stdout": result.stdout, "stderr": result.stderr,
                              "escaped": escaped, "left": left, "secret": case.secret,
                              "exit_codes": list(case.exit_codes), "forbidden": list(case.forbidden)}), flush=True)


def _reset_peak_rss() -> None:
    """Start the high-water mark (VmHWM) afresh at the current resident size (Linux >= 4.0).
    Where that cannot be done the peak stays the process's own so far: a stricter bound."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    """This process's own peak. Not getrusage's ru_maxrss: that survives fork + execve, so under a
    large pytest process (the whole suite, ~1.1 GiB) every class would report the parent's size."""
    status = Path("/proc/self/status")
    if status.exists():
        return int(status.read_text().split("VmHWM:")[1].split()[0]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(Path(sys.argv[1]), [int(k) for k in sys.argv[2].split(",")])
