"""safeio: the bounded JSON parser every reader of outside JSON uses, and the no-follow read."""
import json
import os
import time

import pytest

from bastion.errors import CheckpointError
from bastion.safeio import MAX_JSON_DEPTH, json_depth, parse_json, read_regular


@pytest.mark.parametrize("text, depth", [
    ('{"a": [1, {"b": "[[[[", "c": "\\"[["}]}', 3),  # brackets and escaped quotes inside strings ignore
    ("[]" * 50, 1),
    ('"]]]]]]]]" ' + "[" * 70, 70),  # closing brackets in a string cannot hide real depth
    ('"unterminated [[[[[[', 0),
    ("1", 0),
])
def test_json_depth_counts_structure_only(text, depth):
    assert json_depth(text.encode()) == depth


def test_deep_json_is_one_error_before_parsing():
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 70 + b"1" + b"}" * 70):
        with pytest.raises(CheckpointError, match=r"^x\.json: JSON nested \d+ levels deep, over the limit of 64$"):
            parse_json(raw, CheckpointError, "x.json")
    nested = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert parse_json(nested, CheckpointError, "x.json") is not None  # the limit itself is allowed


@pytest.mark.parametrize("raw, message", [
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b'{"a": ', "not valid JSON"),
    (b'"\\ud800"', None),  # a lone surrogate escape is valid JSON (Python keeps it)
])
def test_bad_json_is_one_line(raw, message):
    if message is None:
        parse_json(raw, CheckpointError, "f")
        return
    with pytest.raises(CheckpointError, match=message) as info:
        parse_json(raw, CheckpointError, "f")
    assert "\n" not in str(info.value)


def test_depth_scan_is_linear_on_hostile_quotes():
    # Escaped quotes outside any string: a naive string regex restarts at every quote (quadratic).
    raw = b'\\"' * 1_000_000
    start = time.perf_counter()
    json_depth(raw)
    json_depth(json.dumps({f"t{i}": [i, "x"] for i in range(200_000)}).encode())
    assert time.perf_counter() - start < 30  # (seconds, not minutes: a quadratic scan takes hours)


def test_read_regular_refuses_links_and_non_files(tmp_path):
    target = tmp_path / "real"
    target.write_bytes(b"secret")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_regular(tmp_path / "link", 100, CheckpointError)
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_regular(tmp_path, 100, CheckpointError)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(CheckpointError):
        read_regular(tmp_path / "fifo", 100, CheckpointError)  # refused at once, not waiting for a writer
    assert read_regular(target, 3, CheckpointError) == b"secr"  # at most max_bytes + 1
