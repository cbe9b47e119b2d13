"""Peak memory of reading a data source, measured in a fresh Python process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# VmHWM, not ru_maxrss: getrusage's peak survives execve, so it would include the pytest
# process the child was forked from.
_CHILD = """
import sys
from bastion.config.schema import DataConfig
from bastion.data.sources import iter_documents
from bastion.errors import DataError
try:
    print(sum(1 for _ in iter_documents(DataConfig(sources=[sys.argv[1]], allowed_roots=[sys.argv[2]]))), "documents")
except DataError as exc:
    print(exc)
status = open("/proc/self/status").read()
print(int(status.split("VmHWM:")[1].split()[0]) // 1024)
"""


def read_in_child(source: Path, root: Path) -> tuple[str, int]:
    """(the documents read or the DataError, peak RSS in MiB) of `iter_documents` on one source."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    run = subprocess.run([sys.executable, "-c", _CHILD, str(source), str(root)], capture_output=True, text=True,
                         timeout=120, env=env)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and len(lines) == 2, run.stdout + run.stderr
    return lines[0], int(lines[1])
