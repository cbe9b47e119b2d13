"""The hostile-input suite (issue 13): every case of tests/hostile/corpus.py through every CLI
verb that reads it, in a process apart from pytest's (one for all the classes: a start of
Python, torch and the CLI costs more than most classes' commands); for every command:

  * the exit status is 2 (or the case's own), and a refusal is ONE line on stderr ("error: ..."),
  * no traceback, no escaped exception, no native crash,
  * no file is left outside the command's output path, and no command takes over
    SECONDS_BOUND (a refusal comes before the work, not after it),
  * a secret-valued environment variable never shows up in any output,
and across the whole run no hostile pickle ever executed (its sentinel file never appears),
and each class's peak memory (measured from the class's own start, see runner.py) stays
under PEAK_RSS_BOUND."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import SENTINEL_NAME, build_base, cases  # noqa: E402

# Python, torch and the CLI's imports take ~300 MiB and the classes peak at 300-420 MiB with
# the tiny models they load; never what a hostile header or archive merely claims (a 512 MB
# gzip bomb, 2**93-element tensors, 64 MiB zstd frames, billion-laugh YAML).
PEAK_RSS_BOUND = 768 * 2**20
SECONDS_BOUND = 20.0
CLASSES = sorted({case.klass for case in cases(Path("/nonexistent"))})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    base = build_base(root / "base")
    (root / "base.json").write_text(json.dumps({k: str(v) for k, v in dataclasses.asdict(base).items()}))
    for case in cases(root / SENTINEL_NAME):
        folder = root / str(case.klass) / case.name
        folder.mkdir(parents=True)
        case.build(folder, base)
    (root / "outputs").mkdir()
    return root


def _problems(record: dict) -> list[str]:
    where = f"{record['case']}: bastion {' '.join(record['command'])}"
    stderr_lines = [line for line in record["stderr"].splitlines() if line.strip()]
    text = record["stdout"] + record["stderr"] + (record["escaped"] or "")
    problems = []
    if record["escaped"]:
        problems.append(f"{where}: an exception escaped:\n{record['escaped'][-1500:]}")
    elif record["exit_code"] not in record["exit_codes"]:
        problems.append(f"{where}: exit {record['exit_code']}, expected {record['exit_codes']}: {text[-500:]}")
    if "Traceback" in text:
        problems.append(f"{where}: a traceback was printed: {text[-800:]}")
    if record["exit_code"] == 2 and (len(stderr_lines) != 1 or not stderr_lines[0].startswith("error:")):
        problems.append(f"{where}: the refusal is not one 'error:' line: {record['stderr'][-800:]!r}")
    for word in record["forbidden"]:
        if word in text:
            problems.append(f"{where}: the answer says {word!r}: {text[-300:]}")
    if record["secret"] and record["secret"] in text:
        problems.append(f"{where}: the secret value was printed")
    if record["seconds"] > SECONDS_BOUND:
        problems.append(f"{where}: took {record['seconds']:.1f} s")
    if record["left"]:
        problems.append(f"{where}: left files outside its output: {record['left'][:5]}")
    return problems


@pytest.fixture(scope="module")
def reports(corpus):
    """Every class through the runner, in one process: {class: (its command records, its summary)},
    and the runner's exit status and stderr (a class missing from the dict is one it died in or
    never reached)."""
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("runner.py")), str(corpus),
                          ",".join(map(str, CLASSES))],
                         capture_output=True, text=True, timeout=3600, cwd=corpus,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    by_class, commands = {}, []
    for record in (json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")):
        if "peak_rss_bytes" in record:
            by_class[record["class"]] = (commands, record)
            commands = []
        else:
            commands.append(record)
    return by_class, run


@pytest.mark.parametrize("klass", CLASSES)
def test_hostile_class(corpus, reports, klass):
    by_class, run = reports
    assert run.returncode == 0 and klass in by_class and by_class[klass][0], (
        f"the runner died (status {run.returncode}; class {klass} {'ended' if klass in by_class else 'never ended'}):"
        f" a native crash or an escape; last command:\n{run.stderr[-3000:]}")
    commands, summary = by_class[klass]
    problems = [p for record in commands for p in _problems(record)]
    assert not problems, f"{len(problems)} of {len(commands)} commands misbehaved:\n\n" + "\n\n".join(problems)
    assert not (corpus / SENTINEL_NAME).exists(), "a hostile pickle executed"
    assert summary["peak_rss_bytes"] < PEAK_RSS_BOUND, f"class {klass} peaked at {summary['peak_rss_bytes'] / 2**20:.0f} MiB"
