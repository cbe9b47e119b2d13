"""A bounded secret scan of files about to leave the machine (`bastion publish`'s gate).

It reuses the secret detectors of `bastion data prepare` (`data/sanitize.py`: API keys, tokens,
JWTs, PEM private keys, URL passwords, high-entropy assignments), on every byte of every file:

  * text files (.md .json .yaml .txt .jinja ...): the UTF-8 text, in chunks;
  * JSON files (tokenizer.json, config.json ...): also every string in them *decoded*, so that
    a key written with JSON escapes ("\\u0041KIA...") is seen as the key it is;
  * safetensors files: the header's tensor names and `__metadata__` strings, decoded, and the
    tensor data as a binary: its runs of printable ASCII (what `strings` shows), since a
    secret stored as bytes in a tensor is still a secret;
  * any other file: as binary, like tensor data.

Bounded: files are read in `CHUNK_BYTES` chunks that overlap by `OVERLAP_CHARS` (longer than
any secret the detectors match, a PEM block included), so memory does not grow with the file;
JSON is parsed only up to `MAX_JSON_BYTES` (a larger file is still scanned as text), and a
safetensors header is bounded as the checkpoint reader bounds it. The SHA-256 of every file is
computed in the same pass, so the gate names the exact bytes it cleared. Findings name the file,
the byte offset (of the chunk, for decoded strings) and the category - never the secret itself.
"""
from __future__ import annotations

import bisect
import codecs
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

from bastion.checkpoint.safetensors_check import MAX_HEADER_BYTES, parse_header
from bastion.config.schema import SanitizeConfig
from bastion.data.sanitize import Redactor
from bastion.errors import BastionError
from bastion.safeio import open_regular, parse_json

CHUNK_BYTES = 8 * 2**20
OVERLAP_CHARS = 80 * 2**10  # > a PEM private key block (sanitize caps one at 64 KiB)
MAX_JSON_BYTES = 64 * 2**20
MIN_LITERAL_CHARS = 8  # a shorter "secret" would match by chance
MAX_FINDINGS = 20  # per scan: enough to act on, a bounded report however bad the folder is
TEXT_SUFFIXES = frozenset({".md", ".json", ".yaml", ".yml", ".txt", ".jinja", ".py", ".cfg", ".toml", ".csv"})
# Binary data is scanned as `strings` shows it: runs of printable ASCII, each alone. MIN_RUN is
# below the shortest secret the detectors report (12 characters), and rare in random weights.
MIN_RUN = 10
_PRINTABLE_FLAGS = bytes(1 if 0x20 <= b <= 0x7E or b == 0x09 else 0 for b in range(256))
_MIN_RUN_FLAGS = b"\x01" * MIN_RUN


class ScanError(BastionError):
    """A file to be scanned cannot be read as what its name says (not a regular file, a bad header)."""


@dataclass(frozen=True)
class SecretFinding:
    file: str  # the path inside the scanned folder
    where: str  # "byte 1234", "safetensors metadata", "JSON string"
    category: str

    def __str__(self) -> str:
        return f"{self.file} ({self.where}): {self.category}"


@dataclass(frozen=True)
class ScannedFile:
    name: str  # relative path with "/" separators
    size: int
    sha256: str


@dataclass
class ScanResult:
    files: list[ScannedFile] = field(default_factory=list)
    findings: list[SecretFinding] = field(default_factory=list)
    truncated: bool = False  # more findings than MAX_FINDINGS: only the first are listed


def secret_detector() -> Redactor:
    """The data pipeline's detectors, secrets only: PII in a model card or vocabulary (an
    author's address, digits in merges) is not what this gate refuses."""
    return Redactor(SanitizeConfig(emails=False, phones=False, ip_addresses=False, credit_cards=False,
                                   ibans=False, national_ids=False, names=False, secrets=True))


class _Scanner:
    def __init__(self, result: ScanResult, detector: Redactor, literals: dict[str, str] | None = None):
        self.result, self.detector = result, detector
        # Exact values known to be secret (the upload token): label -> value, searched verbatim.
        self.literals = {label: value for label, value in (literals or {}).items() if len(value) >= MIN_LITERAL_CHARS}

    def add(self, file: str, where: str, category: str) -> None:
        if len(self.result.findings) >= MAX_FINDINGS:
            self.result.truncated = True
            return
        finding = SecretFinding(file, where, category)
        if finding not in self.result.findings:
            self.result.findings.append(finding)

    def text(self, file: str, text: str, where: str, base: int = 0, skip_before: int = 0) -> None:
        """Findings in `text`; `skip_before`: the overlap with the previous chunk, already seen."""
        for found in self.detector.find(text):
            if found.end > skip_before:
                self.add(file, where.format(offset=base + found.start), found.category)
        for label, value in self.literals.items():
            at = text.find(value, max(0, skip_before - len(value) + 1))
            if at >= 0:
                self.add(file, where.format(offset=base + at), label)

    def strings(self, file: str, values: Iterator[str], where: str) -> None:
        """Decoded strings (JSON keys and values), scanned in bounded batches."""
        batch: list[str] = []
        size = 0
        for value in values:
            batch.append(value)
            size += len(value) + 1
            if size >= CHUNK_BYTES:
                self.text(file, "\n".join(batch), where)
                batch, size = [], 0
        if batch:
            self.text(file, "\n".join(batch), where)


def _json_strings(node: object) -> Iterator[str]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            for key, value in item.items():
                yield key
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _scan_text_stream(scanner: _Scanner, name: str, fh: BinaryIO, digest: "hashlib._Hash", *,
                      keep: bool = False) -> bytes:
    """Scan the rest of `fh` as UTF-8 text in overlapping chunks; returns its bytes when `keep`
    (a JSON file to parse, bounded by the caller)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    offset, tail, kept = 0, "", bytearray()
    while True:
        chunk = fh.read(CHUNK_BYTES)
        text = decoder.decode(chunk, final=not chunk)
        if chunk:
            digest.update(chunk)
            if keep:
                kept += chunk
        if text:
            window = tail + text
            # Offsets in characters (bytes for ASCII text).
            scanner.text(name, window, "offset {offset}", base=offset - len(tail), skip_before=len(tail))
            offset += len(text)
            tail = window[-OVERLAP_CHARS:]
        if not chunk:
            return bytes(kept)


def _scan_binary_stream(scanner: _Scanner, name: str, fh: BinaryIO, digest: "hashlib._Hash", start: int = 0) -> None:
    """Scan the rest of `fh` (from file offset `start`) as binary: its runs of printable ASCII of
    at least MIN_RUN bytes, each alone. Printable bytes at a chunk's end are carried (at most
    OVERLAP_CHARS) into the next chunk; a finding seen twice is kept once."""
    offset, carry = start, b""
    while chunk := fh.read(CHUNK_BYTES):
        digest.update(chunk)
        buf = carry + chunk
        base = offset - len(carry)
        runs, trailing = _printable_runs(buf)
        # Printable bytes at the end may start a run the next chunk continues: carry them.
        carry = buf[max(trailing, len(buf) - OVERLAP_CHARS):]
        _scan_runs(scanner, name, runs, base)
        offset += len(chunk)


def _printable_runs(buf: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """(offset, bytes) of every run of at least MIN_RUN printable ASCII bytes in `buf`, and where
    its trailing printable bytes start (len(buf) if none): the bytes mapped to 1 (printable) /
    0 by `translate`, then the runs found with `bytes.find`, both at memory speed (a regex
    over random bytes would start a match at every printable byte)."""
    flags = buf.translate(_PRINTABLE_FLAGS)
    runs, pos = [], 0
    while (start := flags.find(_MIN_RUN_FLAGS, pos)) >= 0:
        end = flags.find(b"\x00", start)
        end = len(flags) if end < 0 else end
        runs.append((start, buf[start:end]))
        pos = end
    return runs, flags.rfind(b"\x00") + 1


def _scan_runs(scanner: _Scanner, name: str, runs: list[tuple[int, bytes]], base: int) -> None:
    """The runs joined by newlines, scanned at once; findings mapped back to file offsets."""
    if not runs:
        return
    text_starts, pos, parts = [], 0, []
    for _, run in runs:
        text_starts.append(pos)
        parts.append(run.decode("ascii"))
        pos += len(run) + 1
    text = "\n".join(parts)
    for found in scanner.detector.find(text):
        i = bisect.bisect_right(text_starts, found.start) - 1
        scanner.add(name, f"offset {base + runs[i][0] + found.start - text_starts[i]}", found.category)
    for label, value in scanner.literals.items():
        at = text.find(value)
        if at >= 0:
            i = bisect.bisect_right(text_starts, at) - 1
            scanner.add(name, f"offset {base + runs[i][0] + at - text_starts[i]}", label)


def _scan_safetensors(scanner: _Scanner, name: str, path: Path, fh: BinaryIO, digest: "hashlib._Hash",
                      size: int) -> None:
    """The header validated by the one safetensors header reader (`parse_header`), its tensor
    names and metadata scanned decoded, its raw text too; then the tensor data as binary."""
    head = fh.read(8)
    header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
    raw = fh.read(min(header_len, MAX_HEADER_BYTES))
    digest.update(head + raw)
    tensors, metadata = parse_header(head + raw, path, size=size)
    scanner.strings(name, iter(tensors), "safetensors tensor names")
    scanner.strings(name, _json_strings(metadata), "safetensors metadata")
    scanner.text(name, raw.decode("utf-8", "replace"), "safetensors header")
    _scan_binary_stream(scanner, name, fh, digest, start=8 + header_len)


def scan_file(scanner: _Scanner, path: Path, name: str) -> ScannedFile:
    digest = hashlib.sha256()
    suffix = path.suffix.lower()
    with open_regular(path, ScanError) as fh:
        size = os.fstat(fh.fileno()).st_size
        if suffix == ".safetensors":
            _scan_safetensors(scanner, name, path, fh, digest, size)
        elif suffix not in TEXT_SUFFIXES:
            _scan_binary_stream(scanner, name, fh, digest)
        else:
            keep = suffix == ".json" and size <= MAX_JSON_BYTES
            kept = _scan_text_stream(scanner, name, fh, digest, keep=keep)
            if keep:
                try:
                    scanner.strings(name, _json_strings(parse_json(kept, ScanError, str(path))), "JSON string")
                except ScanError:
                    pass  # not JSON after all: its text was scanned above
        if fh.read(1):
            raise ScanError(f"{path}: grew while it was scanned")
    return ScannedFile(name, size, digest.hexdigest())


def listed_files(folder: Path) -> list[str]:
    """Every file under `folder` as a relative "/" path, sorted; links and special files refused
    (what is uploaded is exactly what is scanned: no link can point the upload elsewhere)."""
    names: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        for entry in [*dirnames, *filenames]:
            mode = os.lstat(here / entry).st_mode
            if stat.S_ISLNK(mode):
                raise ScanError(f"{here / entry}: a symbolic link; a published folder holds regular files only")
            if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
                raise ScanError(f"{here / entry}: not a regular file")
        names.extend((here / f).relative_to(folder).as_posix() for f in filenames)
    return sorted(names)


def scan_folder(folder: str | Path, literals: dict[str, str] | None = None) -> ScanResult:
    """Scan every file under `folder` for secrets, and for the exact `literals` (label -> value:
    the upload token, which must not travel inside what it uploads); returns each file's size
    and SHA-256 (as read by the scan) and the findings (at most MAX_FINDINGS)."""
    folder = Path(folder)
    result = ScanResult()
    scanner = _Scanner(result, secret_detector(), literals)
    for name in listed_files(folder):
        result.files.append(scan_file(scanner, folder / name, name))
    return result


def scan_text(text: str, name: str) -> list[SecretFinding]:
    """Findings in one text (a card before it is written, in tests)."""
    result = ScanResult()
    _Scanner(result, secret_detector()).text(name, text, "offset {offset}")
    return result.findings


__all__ = ["MAX_FINDINGS", "ScanError", "ScanResult", "ScannedFile", "SecretFinding", "listed_files", "scan_folder",
           "scan_text", "secret_detector"]
