"""`data.engine: datatrove`: the per-document steps as datatrove tasks on its local executor
write the same dataset as the local engine."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("datatrove")

from bastion.data import prepare_dataset  # noqa: E402
from bastion.data.distributed import block  # noqa: E402
from bastion.errors import DataError  # noqa: E402
from synthetic.prepare_corpus import dataset_files, mixed_documents, write_sources  # noqa: E402
from synthetic.prepare_corpus import prepare_config as config  # noqa: E402


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.slow)])  # 2: datatrove's process pool
def test_datatrove_local_executor_writes_the_local_engines_bytes(tmp_path: Path, workers: int) -> None:
    src = write_sources(tmp_path / "src", mixed_documents(120), files=5)
    local = prepare_dataset(config(tmp_path, src, "local"))
    spread = prepare_dataset(config(tmp_path, src, "datatrove", engine="datatrove", tasks=3, workers=workers))
    assert dataset_files(tmp_path / "local") == dataset_files(tmp_path / "datatrove")
    assert {**local.to_dict(), "output_dir": ""} == {**spread.to_dict(), "output_dir": ""}
    assert local.near_duplicates_dropped == 1 and local.redactions["EMAIL"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datatrove", "local", "src"]  # work files went too


def test_a_failing_task_fails_the_run_and_writes_nothing(tmp_path: Path) -> None:
    src = write_sources(tmp_path / "src", mixed_documents(40), files=3)
    (src / "part1.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match="datatrove clean stage failed.*part1.jsonl:2"):
        prepare_dataset(config(tmp_path, src, "out", engine="datatrove", tasks=3, workers=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_blocks_cover_everything_in_order() -> None:
    for n in (0, 1, 5, 17):
        for world in (1, 3, 8):
            spans = [block(n, r, world) for r in range(world)]
            assert [i for a, b in spans for i in range(a, b)] == list(range(n))
