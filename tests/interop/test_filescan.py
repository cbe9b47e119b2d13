"""The publish gate's secret scan: every byte of every file, text and binary, bounded, and
findings that name the file and place but never the secret."""
import json
import os

import pytest
import safetensors.torch
import torch

from bastion.errors import CheckpointError
from bastion.interop import filescan
from bastion.interop.filescan import MAX_FINDINGS, ScanError, scan_folder

KEY = "AKIAZ7Q3XK2M9PLW4TRB"  # security-reviewed: a made-up key-shaped string the scanner must find, not a credential
GITHUB = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"


def escaped(text: str) -> str:
    """`text` with every character as a JSON \\u escape: invisible to a scan of the raw bytes."""
    return "".join(f"\\u{ord(c):04x}" for c in text)


def test_secrets_are_found_in_text_json_strings_safetensors_and_binary(tmp_path):
    (tmp_path / "notes.md").write_text(f"deploy with {GITHUB}\n")
    (tmp_path / "tokenizer.json").write_text('{"added": "' + escaped(KEY) + '", "ok": "hello"}')
    safetensors.torch.save_file({"w": torch.zeros(4)}, tmp_path / "meta.safetensors", metadata={"note": KEY})
    # A secret stored as bytes inside tensor data is still a secret.
    data = torch.frombuffer(bytearray(b"\x00" * 64 + KEY.encode() + b"\x00" * 44), dtype=torch.float32)
    safetensors.torch.save_file({"w": data.clone()}, tmp_path / "data.safetensors")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x81" * 500 + GITHUB.encode() + b"\xfe" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "clean.json").write_text(json.dumps({"pad_token": "<pad>", "tokens": ["a", "b"]}))

    result = scan_folder(tmp_path)
    found = {(f.file, f.where.split(" ")[0]) for f in result.findings}
    assert ("notes.md", "offset") in found
    assert ("tokenizer.json", "JSON") in found
    assert ("meta.safetensors", "safetensors") in found
    assert ("data.safetensors", "offset") in found
    assert ("blob.bin", "offset") in found
    assert not any(f.file == "sub/clean.json" for f in result.findings)
    assert all(KEY not in str(f) and GITHUB not in str(f) for f in result.findings)
    assert [f.name for f in result.files] == ["blob.bin", "data.safetensors", "meta.safetensors", "notes.md",
                                              "sub/clean.json", "tokenizer.json"]


def test_a_secret_across_a_chunk_boundary_is_found_once(tmp_path, monkeypatch):
    monkeypatch.setattr(filescan, "CHUNK_BYTES", 4096)
    text = "x" * (4096 - 10) + f" {GITHUB} " + "y" * 5000
    (tmp_path / "big.txt").write_text(text)
    (finding,) = scan_folder(tmp_path).findings
    assert finding.where == f"offset {4096 - 9}"
    (tmp_path / "big.txt").unlink()
    (tmp_path / "weights.bin").write_bytes(b"\x00" * (3 * 4096 - 7) + GITHUB.encode() + b"\xff" * 9000)
    (finding,) = scan_folder(tmp_path).findings
    assert (finding.file, finding.where) == ("weights.bin", f"offset {3 * 4096 - 7}")


def test_literal_values_are_searched_exactly(tmp_path):
    token = "not-a-known-format-but-secret-123"
    (tmp_path / "card.md").write_text(f"token: {token[:10]} and later {token}")
    (finding,) = scan_folder(tmp_path, {"the HF_TOKEN value": token}).findings
    assert finding.category == "the HF_TOKEN value" and token not in str(finding)


def test_findings_are_bounded(tmp_path):
    (tmp_path / "many.txt").write_text("\n".join(f"key {i}: AKIAZ7Q3XK2M9PLW{i:04d}" for i in range(200)))
    result = scan_folder(tmp_path)
    assert len(result.findings) == MAX_FINDINGS and result.truncated


def test_links_and_special_files_are_refused(tmp_path):
    (tmp_path / "real.txt").write_text("hello")
    os.symlink(tmp_path / "real.txt", tmp_path / "link.txt")
    with pytest.raises(ScanError, match="symbolic link"):
        scan_folder(tmp_path)
    os.unlink(tmp_path / "link.txt")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ScanError, match="not a regular file"):
        scan_folder(tmp_path)


def test_a_bad_safetensors_header_is_an_error(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="over the"):  # the one safetensors header reader's refusal
        scan_folder(tmp_path)
