"""Lossless checkpoint compression (`bastion ckpt pack` / `bastion ckpt unpack`).

A packed checkpoint is a directory:
    PACK.json       format, codec, and per original file: its blob (size, BLAKE3 hash) and layout
    MANIFEST.json   the checkpoint's own manifest, verbatim
    <file>.zst      one blob per original file: a run of independent zstd frames

Every original file is cut into sections that cover it in order. In a `*.safetensors` file,
each float tensor of at least SMALL_TENSOR bytes is its own section and is byte-grouped:
byte k of every (little-endian) element goes to plane k (2 planes for bf16/fp16, 4 for fp32,
8 for fp64). The top byte (sign + exponent), which repeats a lot in trained weights, then
sits together and compresses far better than interleaved with near-random mantissa bytes
(the ZipNN observation). Since format 2 each element's bits are first rotated left by one,
as ZipNN does: the sign bit moves to the bottom of the lowest mantissa byte and the top byte
holds the exponent alone (0.3-1% smaller on trained weights; what made the pack's ratio
reach ZipNN's on files without repeats). XOR deltas are not rotated. The rotation and the
split are one pass in C (`planes.py`; numpy where the package was built without a
compiler, same bytes). Planes use fixed zstd settings tuned for them (see `_compressor`); a
plane whose probe slices do not shrink (the low mantissa bytes) is stored in a zstd frame of
raw blocks at zstd's fastest level instead of being entropy-coded for nothing. Everything
else (the JSON header, small or integer tensors, other files) is a plain section at the
chosen zstd level. Sections are compressed in chunks of `chunk_bytes`
input, one zstd frame per plane per chunk, in a thread pool, so memory stays bounded (a few
chunks in flight) and each file is read once, by offset, never through torch.

A chunk of a float tensor is stored whole instead (listed in its section's `raw_chunks`)
when that is smaller: tried when the planes shrink it less than RAW_TRY, or a probe slice
from its middle compresses clearly better whole (repeats the planes cut apart), so byte
planes never cost ratio where they are the wrong tool. A tensor whose bytes equal an earlier
tensor's of the same file (found by a sampled comparison, confirmed in full) is stored once:
its section says `same_as` (the earlier section's index) and holds no frames; unpacking
decodes the earlier section's frames again. Plain zstd of a whole file finds such a repeat
only when it lies within its window (2 MB at level 3); this finds it at any distance, and the
pack compares the digests of the bytes it actually streamed, so a file rewritten mid-pack
cannot produce a wrong pack.

Delta mode (`base=`): a tensor present in the base checkpoint with the same dtype and shape
is XORed with the base's bits before grouping: unchanged weights become zeros, and an
optimizer step that moves a weight slightly flips mostly low mantissa bits. The pack records
the SHA-256 of the base's MANIFEST.json and unpacking refuses any other base.

Unpacking treats the packed directory as hostile: names must be plain file names, every blob
must match its hash in PACK.json before anything is decompressed (BLAKE3 since format 3,
about four times faster than SHA-256 here and as strong for this; SHA-256 in formats 1-2),
no frame may decompress to more than PACK.json declares, and the output must match the original manifest bit for bit
and be of the format each file's name says (`formats.FileCheck`, as packing checked the
source); a `same_as` must name an earlier stored section of the same length (no chains: a
section is decoded at most once more per section that names it, so decoding work stays
bounded by the declared output size). `verify_packed` does all of that without writing anything. Both directions write
into a temporary directory (files 0600, directories 0700) and appear at the destination by
one atomic rename.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import blake3
import numpy as np
import zstandard

import bastion
from bastion.checkpoint import planes as byteplanes
from bastion.checkpoint.checkpoint import resolve_checkpoint
from bastion.checkpoint.formats import FileCheck, check_names, verify_contents
from bastion.checkpoint.manifest import MANIFEST, read_manifest_bytes, verify_directory
from bastion.checkpoint.safetensors_check import MAX_HEADER_BYTES, parse_header
from bastion.errors import CheckpointError
from bastion.safeio import (
    fsync_dir,
    is_sha256,
    make_private_dir,
    open_private,
    read_json_limited,
    write_bytes,
)

PACK = "PACK.json"
FORMAT = "bastion-pack"
FORMAT_VERSION = 3  # 2 added same_as sections and raw_chunks, 3 hashes blobs with BLAKE3; 1 and 2 still unpack
READABLE_VERSIONS = (1, 2, 3)
TRANSFORMS = {1: "byteplanes", 2: "byteplanes-sign-last", 3: "byteplanes-sign-last"}  # 2+: bits rotated left by one first (not in deltas)
BLOB_DIGEST = {1: "sha256", 2: "sha256", 3: "blake3"}  # the blob's hash in PACK.json, by format version
HASHERS = {"sha256": hashlib.sha256, "blake3": blake3.blake3}  # BLAKE3: ~4x faster here, also a 256-bit cryptographic hash
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")  # plain names: no separators, no leading dot
PLANES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}  # other dtypes (ints, bool, fp8) stay one plane
SHARD_SUFFIX = re.compile(r"-\d{5}-of-\d{5}(?=\.safetensors$)")  # model-00001-of-00003.safetensors
SMALL_TENSOR = 4096  # smaller tensors ride along in the surrounding plain section
DEFAULT_CHUNK_BYTES = 8 * 2**20
MIN_CHUNK_BYTES, MAX_CHUNK_BYTES = 4096, 64 * 2**20
IN_FLIGHT_BYTES = 512 * 2**20  # input bytes of the chunks being worked on at once, at most
MAX_PACK_JSON_BYTES = 64 * 2**20
RAW_PROBE_BYTES = 8192  # slice of a chunk compressed whole, to see if planes are the wrong choice
RAW_TRY = 0.92  # a chunk whose planes shrink it less than this, or lose on the probe, is tried whole too
PLANE_PARAMS = zstandard.ZstdCompressionParameters.from_level(1, min_match=7, search_log=1, hash_log=6, chain_log=6)
STORE_LEVEL = -131072  # zstd's fastest level: an incompressible plane costs little more than a copy
STORE_PROBES, STORE_PROBE_BYTES = 3, 16384  # slices of a plane compressed to decide whether to store it
STORE_MIN_SAVING = 64  # bytes a probe must save (0.4%) for its plane to be compressed rather than stored


@dataclass
class FileReport:
    original_bytes: int
    packed_bytes: int
    delta_tensors: int = 0

    @property
    def ratio(self) -> float:
        return self.original_bytes / max(self.packed_bytes, 1)


@dataclass
class PackReport:
    path: Path
    original_bytes: int
    packed_bytes: int  # blobs + PACK.json + MANIFEST.json
    seconds: float
    base_manifest_sha256: str | None = None
    files: dict[str, FileReport] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.original_bytes / max(self.packed_bytes, 1)

    @property
    def mb_per_s(self) -> float:
        return self.original_bytes / 1e6 / max(self.seconds, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "original_bytes": self.original_bytes, "packed_bytes": self.packed_bytes,
            "ratio": round(self.ratio, 4), "seconds": round(self.seconds, 4), "mb_per_s": round(self.mb_per_s, 2),
            "base_manifest_sha256": self.base_manifest_sha256,
            "files": {name: {"original_bytes": f.original_bytes, "packed_bytes": f.packed_bytes,
                             "ratio": round(f.ratio, 4), "delta_tensors": f.delta_tensors} for name, f in self.files.items()},
        }


class _Ref(NamedTuple):
    """Where a tensor's bytes lie in a (base) safetensors file."""
    file: str
    dtype: str
    shape: list
    begin: int
    end: int


# --------------------------------------------------------------------------- pack

def pack_checkpoint(src: str | Path, dst: str | Path, *, base: str | Path | None = None, level: int = 3,
                    threads: int | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> PackReport:
    """Compress checkpoint `src` into a new directory `dst` (refused if it exists). With
    `base`, tensors also in that checkpoint are stored as XOR deltas against it. Every source
    file is checked against the manifest (size first, SHA-256 and format as it streams); a
    mismatch raises CheckpointError and leaves nothing at `dst`."""
    start = time.perf_counter()
    if not (isinstance(level, int) and -7 <= level <= 22):
        raise CheckpointError(f"zstd level must be an integer in -7..22, got {level!r}")
    _check_chunk_bytes(chunk_bytes, "chunk_bytes")
    src = resolve_checkpoint(src)
    manifest, manifest_raw = read_manifest_bytes(src)
    verify_directory(src, manifest, hash_files=False)
    check_names(src, manifest["files"])
    for name in manifest["files"]:
        if not NAME_RE.match(name):
            raise CheckpointError(f"{src / name}: file name not supported by the packed format")
    dst = Path(dst)
    tmp = _temp_dir(dst)
    workers = _threads(threads)
    pack: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "bastion_version": bastion.__version__,
        "codec": {"name": "zstd", "level": level, "chunk_bytes": chunk_bytes, "float_transform": TRANSFORMS[FORMAT_VERSION],
                  "raw_probe": f"chunks tried whole when planes shrink them less than {RAW_TRY} or a probe says so",
                  "plane_params": "level 1, min_match 7, hash_log 6, chain_log 6, search_log 1"},
        "manifest_sha256": hashlib.sha256(manifest_raw).hexdigest(), "base_manifest_sha256": None, "files": {},
    }
    report = PackReport(dst, 0, 0, 0.0)
    try:
        with ExitStack() as stack:
            base_index: dict[tuple[str, str], tuple[_Ref, int]] = {}
            if base is not None:
                base_dir = resolve_checkpoint(base)
                base_manifest, base_raw = read_manifest_bytes(base_dir)
                verify_contents(base_dir, base_manifest)  # its bits go into every delta
                pack["base_manifest_sha256"] = report.base_manifest_sha256 = hashlib.sha256(base_raw).hexdigest()
                for name in base_manifest["files"]:
                    if name.endswith(".safetensors"):
                        fd = stack.enter_context(open(base_dir / name, "rb")).fileno()
                        for tname, ref in _tensor_layout(fd, base_manifest["files"][name]["size"], base_dir / name).items():
                            base_index.setdefault((SHARD_SUFFIX.sub("", name), tname), (ref, fd))
            for name, entry in manifest["files"].items():
                blob = f"{name}.zst"
                meta, delta_count = _pack_file(src / name, entry, tmp / blob, base_index, level, chunk_bytes, workers)
                pack["files"][name] = meta
                report.files[name] = FileReport(entry["size"], meta["blob"]["size"], delta_count)
        write_bytes(tmp / MANIFEST, manifest_raw)
        write_bytes(tmp / PACK, (json.dumps(pack, sort_keys=True, separators=(",", ":")) + "\n").encode())
        _commit(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report.original_bytes = sum(e["size"] for e in manifest["files"].values())
    report.packed_bytes = sum(p.stat().st_size for p in dst.iterdir())
    report.seconds = time.perf_counter() - start
    return report


def _tensor_layout(fd: int, size: int, where: Path) -> dict[str, _Ref]:
    """{name: _Ref with absolute byte offsets} from a safetensors file's header, validated
    strictly (`parse_header`): a file that is not safetensors is refused before anything is
    compressed (as the format check of the bytes streamed would refuse it after)."""
    length = _pread(fd, 0, min(size, 8), where)
    header_len = min(int.from_bytes(length, "little"), MAX_HEADER_BYTES, max(size - 8, 0))
    header, _ = parse_header(length + _pread(fd, 8, header_len, where), where, size=size)
    data_start = 8 + int.from_bytes(length, "little")
    return {tname: _Ref(where.name, info["dtype"], info["shape"], data_start + info["data_offsets"][0],
                        data_start + info["data_offsets"][1]) for tname, info in header.items()}


def _plan(path: Path, size: int, fd: int, base_index: dict) -> list[tuple[dict, int, tuple | None]]:
    """Sections covering the file in order: (section dict for PACK.json, file offset, base
    (fd, offset) for a delta or None). A tensor whose bytes equal an earlier tensor's
    (both stored by an older save of a tied model, or a file written elsewhere) becomes a
    `same_as` section: stored once, whatever the distance between the two."""
    layout = _tensor_layout(fd, size, path) if path.name.endswith(".safetensors") else None
    group = SHARD_SUFFIX.sub("", path.name)
    ordered = sorted((layout or {}).items(), key=lambda item: item[1].begin)
    same_as = _duplicates(fd, [ref for _, ref in ordered], path)
    plan: list[tuple[dict, int, tuple | None]] = []
    index_of: dict[int, int] = {}  # tensor begin -> its section's index in the plan
    cursor = 0
    for tname, ref in ordered:
        length = ref.end - ref.begin
        planes = PLANES.get(ref.dtype, 1)  # length is a whole number of elements: parse_header checked it
        base_ref, base_fd = base_index.get((group, tname), (None, None))
        is_delta = (base_ref is not None and base_ref.dtype == ref.dtype and base_ref.shape == ref.shape
                    and base_ref.end - base_ref.begin == length)
        target = same_as.get(ref.begin)
        shared = target is not None or ref.begin in same_as.values()
        if ref.begin < cursor or length < SMALL_TENSOR or (planes == 1 and not is_delta and not shared):
            continue  # stays inside the surrounding plain section
        if ref.begin > cursor:
            plan.append(({"length": ref.begin - cursor, "planes": 1}, cursor, None))
        section: dict[str, Any] = {"length": length, "planes": planes, "tensor": tname}
        if target is not None and target in index_of:
            section.update(planes=1, same_as=index_of[target])
            plan.append((section, ref.begin, None))
        else:
            if is_delta:
                section["delta"] = {"file": base_ref.file, "dtype": ref.dtype, "shape": ref.shape}
            index_of[ref.begin] = len(plan)
            plan.append((section, ref.begin, (base_fd, base_ref.begin) if is_delta else None))
        cursor = ref.end
    if size > cursor:
        plan.append(({"length": size - cursor, "planes": 1}, cursor, None))
    return plan


def _duplicates(fd: int, refs: list[_Ref], where: Path) -> dict[int, int]:
    """{begin: begin of the first tensor with the same bytes} among tensors of SMALL_TENSOR
    bytes or more. Tensors of one length are compared on a small sample first, and only
    the candidates that agree there are read and compared in full: distinct tensors cost
    two small reads each."""
    by_length: dict[int, list[_Ref]] = {}
    for ref in refs:
        if ref.end - ref.begin >= SMALL_TENSOR:
            by_length.setdefault(ref.end - ref.begin, []).append(ref)
    found: dict[int, int] = {}
    for length, group in by_length.items():
        firsts: list[tuple[_Ref, bytes]] = []
        for ref in group:
            sample = _sample(fd, ref.begin, length, where)
            match = next((first for first, first_sample in firsts
                          if first_sample == sample and _same_bytes(fd, first.begin, ref.begin, length, where)), None)
            if match is None:
                firsts.append((ref, sample))
            else:
                found[ref.begin] = match.begin
    return found


def _sample(fd: int, begin: int, length: int, where: Path) -> bytes:
    edge = min(length, SMALL_TENSOR // 2)
    return _pread(fd, begin, edge, where) + _pread(fd, begin + length - edge, edge, where)


def _same_bytes(fd: int, a: int, b: int, length: int, where: Path) -> bool:
    for pos in range(0, length, DEFAULT_CHUNK_BYTES):
        n = min(DEFAULT_CHUNK_BYTES, length - pos)
        if _pread(fd, a + pos, n, where) != _pread(fd, b + pos, n, where):
            return False
    return True


def _pack_file(path: Path, entry: dict, blob_path: Path, base_index: dict, level: int, chunk_bytes: int,
               workers: int) -> tuple[dict, int]:
    source, blob_hash = FileCheck(path, entry), HASHERS[BLOB_DIGEST[FORMAT_VERSION]]()
    blob_size = 0
    with open(path, "rb") as fh, open_private(blob_path) as out:
        fd = fh.fileno()
        size = os.fstat(fd).st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path}: size {size} does not match manifest ({entry['size']})")
        plan = _plan(path, size, fd, base_index)
        shared = {section["same_as"] for section, _, _ in plan if "same_as" in section}
        digests: dict[int, list[bytes]] = {}  # section index -> BLAKE3 digest of each chunk, for same_as and their targets

        def finish(tag: tuple[int, int], raw: bytes, frames: list[bytes], whole: bool, digest: bytes | None) -> None:
            nonlocal blob_size
            index, chunk = tag
            section = plan[index][0]
            source.update(raw)
            if whole and section["planes"] > 1:
                section.setdefault("raw_chunks", []).append(chunk)
            if digest is not None:
                digests.setdefault(index, []).append(digest)
            for frame in frames:
                out.write(frame)
                blob_hash.update(frame)
                blob_size += len(frame)
                section["frames"].append(len(frame))

        with _Pipeline(workers, chunk_bytes, finish) as pipe:
            for index, (section, offset, base_at) in enumerate(plan):
                section["frames"] = []
                for chunk, pos in enumerate(range(0, section["length"], chunk_bytes)):
                    n = min(chunk_bytes, section["length"] - pos)
                    if "same_as" in section:
                        pipe.submit((index, chunk), _read_chunk, fd, offset + pos, n, path)
                        continue
                    base_chunk = (base_at[0], base_at[1] + pos) if base_at else None
                    pipe.submit((index, chunk), _encode_chunk, fd, offset + pos, n, section["planes"], base_chunk,
                                level, index in shared, path)
        out.flush()
        os.fsync(out.fileno())
    source.finish()  # size, SHA-256 and format of exactly the bytes packed
    for index, (section, _, _) in enumerate(plan):
        # Compared on the bytes actually streamed: a file rewritten between planning and packing is caught.
        if "same_as" in section and digests.get(index) != digests.get(section["same_as"]):
            raise CheckpointError(f"{path}: changed while being packed (tensor {section['tensor']!r})")
    meta = {"size": entry["size"], "sha256": entry["sha256"],
            "blob": {"name": blob_path.name, "size": blob_size, BLOB_DIGEST[FORMAT_VERSION]: blob_hash.hexdigest()},
            "sections": [section for section, _, _ in plan]}
    return meta, sum(1 for section, _, _ in plan if "delta" in section)


_local = threading.local()


def _compressor(level: int | None) -> zstandard.ZstdCompressor:
    """A per-thread zstd context (they are not thread-safe): at `level`, or with None the
    settings for byte planes. A plane is close to i.i.d. bytes (exponents, or mantissa
    noise), where LZ matching mostly adds cost: short matches are refused and the match
    finder kept tiny, so it is in effect entropy coding plus long runs (the zeros of a delta).
    On exponent planes this is ~20% smaller than level 3 and several times faster; higher levels
    gain nothing there."""
    cache = _local.__dict__.setdefault("cctx", {})
    if level not in cache:
        params = PLANE_PARAMS if level is None else zstandard.ZstdCompressionParameters.from_level(level)
        cache[level] = zstandard.ZstdCompressor(compression_params=params)
    return cache[level]


def _read_chunk(fd: int, offset: int, n: int, where: Path) -> tuple[bytes, list[bytes], bool, bytes]:
    """A chunk of a same_as section: nothing to store, only its digest to compare."""
    raw = _pread(fd, offset, n, where)
    return raw, [], True, blake3.blake3(raw).digest()


def _encode_chunk(fd: int, offset: int, n: int, planes: int, base_at: tuple | None, level: int, digest: bool,
                  where: Path) -> tuple[bytes, list[bytes], bool, bytes | None]:
    """(the chunk's bytes, its frames, whether it was compressed whole, its BLAKE3 digest if asked).
    A float chunk is split into byte planes unless compressing it whole does better: tried
    when the planes barely shrink it or a probe slice compresses better whole."""
    raw = _pread(fd, offset, n, where)
    data = np.frombuffer(raw, np.uint8)
    if base_at is not None:
        data = data ^ np.frombuffer(_pread(base_at[0], base_at[1], n, "base checkpoint"), np.uint8)
    checksum = blake3.blake3(raw).digest() if digest else None
    if planes == 1:
        return raw, [_compressor(level).compress(data)], True, checksum
    rotate = base_at is None and TRANSFORMS[FORMAT_VERSION] == "byteplanes-sign-last"  # XOR deltas: not rotated
    grouped = byteplanes.split(data, planes, rotate, out=_scratch(n)).reshape(planes, -1)
    frames = [_compress_plane(plane) for plane in grouped]
    planes_size = sum(len(frame) for frame in frames)
    if planes_size > RAW_TRY * n or _probe_prefers_whole(data, planes, planes_size / n, level):
        whole = _compressor(level).compress(data)
        if len(whole) < planes_size:
            return raw, [whole], True, checksum
    return raw, frames, False, checksum


def _scratch(n: int) -> np.ndarray:
    """This thread's buffer of at least n bytes for the planes of one chunk, reused chunk after chunk."""
    buffer = getattr(_local, "scratch", None)
    if buffer is None or buffer.size < n:
        buffer = _local.scratch = np.empty(n, np.uint8)
    return buffer


def _compress_plane(plane: np.ndarray) -> bytes:
    """One plane's frame. Mantissa planes are close to random: when slices from the plane's
    start, middle and end all shrink by less than STORE_MIN_SAVING bytes, it is stored (a
    zstd frame of raw blocks, at zstd's fastest level) instead of entropy-coded for nothing."""
    if plane.size >= 4 * STORE_PROBE_BYTES:
        cctx, step = _compressor(None), (plane.size - STORE_PROBE_BYTES) // (STORE_PROBES - 1)
        probes = (plane[i * step:i * step + STORE_PROBE_BYTES] for i in range(STORE_PROBES))
        if all(len(cctx.compress(probe)) > STORE_PROBE_BYTES - STORE_MIN_SAVING for probe in probes):
            return _compressor(STORE_LEVEL).compress(plane)
    return _compressor(None).compress(plane)


def _probe_prefers_whole(data: np.ndarray, planes: int, planes_ratio: float, level: int) -> bool:
    """Whether a slice from the middle of the chunk compresses clearly better whole than the
    planes did (repeated rows, patterns the planes cut apart). Cheap: one small frame."""
    if data.size <= 2 * RAW_PROBE_BYTES:
        return True  # a small chunk: trying it whole costs little
    start = (data.size // 2) - (data.size // 2) % planes
    probe = data[start:start + RAW_PROBE_BYTES]
    return len(_compressor(level).compress(probe)) < 0.9 * planes_ratio * probe.size


# --------------------------------------------------------------------------- unpack

def verify_packed(packed: str | Path, *, base: str | Path | None = None, threads: int | None = None) -> dict[str, Any]:
    """Check a packed checkpoint without writing anything: PACK.json well formed and consistent
    with MANIFEST.json, nothing else in the directory, every blob's size and SHA-256, then
    every blob decompressed (no frame past the size PACK.json declares, a bomb is refused as
    it expands) into exactly the bytes the manifest lists, each of the format its name says.
    A delta pack needs its `base`, as for unpacking. Returns PACK.json's content."""
    packed = Path(packed)
    pack, _, _ = _read_pack(packed)
    _verify_blobs(packed, pack)
    _restore(packed, pack, base, _threads(threads), None)
    return pack


def unpack_checkpoint(packed: str | Path, dst: str | Path, *, base: str | Path | None = None,
                      threads: int | None = None) -> Path:
    """Restore a packed checkpoint into a new directory `dst` (refused if it exists). A delta
    pack needs `base`: the very checkpoint it was packed against (same MANIFEST.json bytes).
    The result is checked against the original manifest before it appears at `dst`."""
    packed, dst = Path(packed), Path(dst)
    pack, manifest, manifest_raw = _read_pack(packed)
    _verify_blobs(packed, pack)
    tmp = _temp_dir(dst)
    try:
        _restore(packed, pack, base, _threads(threads), tmp)
        write_bytes(tmp / MANIFEST, manifest_raw)
        verify_directory(tmp, manifest, hash_files=False)  # every file's SHA-256 was checked as it was written
        _commit(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _restore(packed: Path, pack: dict, base: str | Path | None, workers: int, out_dir: Path | None) -> None:
    """Decompress every file of a pack, each checked as it streams against its manifest entry
    (size, SHA-256, format); written into `out_dir` unless that is None (verification only)."""
    with ExitStack() as stack:
        base_dir, base_manifest = _delta_base(packed, pack, base)
        base_files: dict[str, tuple[int, dict[str, _Ref]]] = {}
        for name, meta in pack["files"].items():
            sections = []
            for section in meta["sections"]:
                base_at = None
                if "delta" in section:
                    base_at = _base_tensor(base_dir, base_manifest, base_files, stack, section, packed / PACK)
                sections.append((section, base_at))
            out_path = None if out_dir is None else out_dir / name
            _unpack_file(packed / meta["blob"]["name"], FileCheck(packed / name, meta), sections, out_path,
                         pack["format_version"] >= 2,
                         pack["codec"]["chunk_bytes"], workers)


def _delta_base(packed: Path, pack: dict, base: str | Path | None) -> tuple[Path | None, dict | None]:
    """The verified base checkpoint (folder, manifest) a delta pack needs; (None, None) for a
    pack that is not a delta."""
    expected = pack["base_manifest_sha256"]
    if expected is None:
        return None, None
    if base is None:
        raise CheckpointError(f"{packed}: packed as a delta against base checkpoint with MANIFEST.json "
                              f"sha256 {expected}; pass that checkpoint as base")
    base_dir = resolve_checkpoint(base)
    base_manifest, base_raw = read_manifest_bytes(base_dir)
    actual = hashlib.sha256(base_raw).hexdigest()
    if actual != expected:
        raise CheckpointError(f"{base_dir}: wrong base checkpoint for {packed}: its MANIFEST.json sha256 is "
                              f"{actual}, the pack was made against {expected}")
    verify_contents(base_dir, base_manifest)
    return base_dir, base_manifest


def _base_tensor(base_dir: Path, base_manifest: dict, base_files: dict, stack: ExitStack, section: dict,
                 where: Path) -> tuple[int, int]:
    """(fd, offset) of the base tensor a delta section was made against."""
    delta, tname = section["delta"], section["tensor"]
    name = delta["file"]
    if name not in base_manifest["files"]:
        raise CheckpointError(f"{where}: delta for {tname!r} refers to {name!r}, which the base checkpoint lacks")
    if name not in base_files:
        fd = stack.enter_context(open(base_dir / name, "rb")).fileno()
        base_files[name] = (fd, _tensor_layout(fd, base_manifest["files"][name]["size"], base_dir / name))
    fd, layout = base_files[name]
    ref = layout.get(tname)
    if ref is None or ref.dtype != delta["dtype"] or ref.shape != delta["shape"] or ref.end - ref.begin != section["length"]:
        raise CheckpointError(f"{base_dir / name}: tensor {tname!r} is missing or differs from the one "
                              f"{where} was packed against")
    return fd, ref.begin


def _unpack_file(blob_path: Path, check: FileCheck, sections: list, out_path: Path | None, rotated: bool, chunk_bytes: int,
                 workers: int) -> None:
    """Decode one blob section by section, feeding `check` (and `out_path`, if any) in order.
    A same_as section decodes its target's frames again."""
    starts, offset = [], 0
    for section, _ in sections:
        starts.append(offset)
        offset += sum(section["frames"])
    with ExitStack() as files:
        blob_fd = files.enter_context(open(blob_path, "rb")).fileno()
        out = None if out_path is None else files.enter_context(open_private(out_path))

        def finish(_section: Any, data: np.ndarray, _unused: Any) -> None:
            check.update(memoryview(data))
            if out is not None:
                out.write(data)

        with _Pipeline(workers, chunk_bytes, finish) as pipe:
            for index, (section, _) in enumerate(sections):
                source = section.get("same_as", index)
                stored, base_at = sections[source]
                frames, at = iter(stored["frames"]), starts[source]
                whole = set(stored.get("raw_chunks", ()))
                for chunk, pos in enumerate(range(0, section["length"], chunk_bytes)):
                    n = min(chunk_bytes, section["length"] - pos)
                    chunk_frames = []
                    for _ in range(1 if chunk in whole else stored["planes"]):
                        size = next(frames)
                        chunk_frames.append(_pread(blob_fd, at, size, blob_path))
                        at += size
                    base_chunk = (base_at[0], base_at[1] + pos) if base_at else None
                    planes = len(chunk_frames)
                    rotate = rotated and planes > 1 and "delta" not in stored  # XOR deltas are not rotated
                    pipe.submit(section, _decode_chunk, chunk_frames, n, planes, rotate, base_chunk,
                                blob_path)
        if out is not None:
            out.flush()
            os.fsync(out.fileno())
    # The blob was hashed before this; were it swapped since, this check still catches it.
    check.finish()


_dlocal = threading.local()


def _decode_chunk(frames: list[bytes], n: int, planes: int, rotated: bool, base_at: tuple | None,
                  where: Path) -> tuple[np.ndarray, None]:
    dctx = getattr(_dlocal, "dctx", None) or zstandard.ZstdDecompressor()
    _dlocal.dctx = dctx
    per_plane = n // planes
    grouped = np.empty(n, np.uint8)
    for k, frame in enumerate(frames):
        grouped[k * per_plane:(k + 1) * per_plane] = np.frombuffer(_decompress(dctx, frame, per_plane, where), np.uint8)
    out = grouped if planes == 1 else byteplanes.join(grouped, planes, rotate=rotated)
    if base_at is not None:
        out ^= np.frombuffer(_pread(base_at[0], base_at[1], n, "base checkpoint"), np.uint8)
    return out, None


def _decompress(dctx: zstandard.ZstdDecompressor, frame: bytes, size: int, where: Path) -> bytes:
    """One frame that must decompress to exactly `size` bytes; a frame claiming or producing
    more is refused before any large allocation (decompression bomb)."""
    try:
        declared = zstandard.frame_content_size(frame)
        if declared not in (-1, size):
            raise CheckpointError(f"{where}: zstd frame declares {declared} bytes, PACK.json allows {size}")
        data = dctx.decompress(frame, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CheckpointError(f"{where}: corrupt zstd frame ({exc})") from None
    if len(data) != size:
        raise CheckpointError(f"{where}: zstd frame decompressed to {len(data)} bytes, PACK.json declares {size}")
    return data


def _read_pack(packed: Path) -> tuple[dict, dict, bytes]:
    """PACK.json validated as hostile input, and the MANIFEST.json (parsed, and its bytes) it belongs to."""
    if packed.is_symlink() or not packed.is_dir():
        raise CheckpointError(f"{packed}: not a packed checkpoint directory")
    where = packed / PACK
    if not where.exists():
        raise CheckpointError(f"{packed}: no {PACK}; not a packed checkpoint")
    pack = read_json_limited(where, MAX_PACK_JSON_BYTES, CheckpointError, "pack index")
    manifest, manifest_raw = read_manifest_bytes(packed)
    check_names(packed, manifest["files"])

    def check(ok: bool, message: str) -> None:
        if not ok:
            raise CheckpointError(f"{where}: {message}")

    check(isinstance(pack, dict) and pack.get("format") == FORMAT, f"not a {FORMAT} index")
    version = pack.get("format_version")
    check(_is_int(version) and version in READABLE_VERSIONS,
          f"format version {version!r} is not supported (expected one of {READABLE_VERSIONS})")
    codec = pack.get("codec")
    check(isinstance(codec, dict) and codec.get("name") == "zstd"
          and codec.get("float_transform") == TRANSFORMS[version], "unsupported codec")
    _check_chunk_bytes(codec.get("chunk_bytes"), f"{where}: codec.chunk_bytes")
    check(pack.get("manifest_sha256") == hashlib.sha256(manifest_raw).hexdigest(),
          f"does not belong to the {MANIFEST} beside it (sha256 mismatch)")
    base_id = pack.get("base_manifest_sha256")
    check(base_id is None or is_sha256(base_id), "malformed base_manifest_sha256")
    files = pack.get("files")
    check(isinstance(files, dict) and set(files) == set(manifest["files"]), f"files differ from those in {MANIFEST}")
    blobs = set()
    for name, meta in files.items():
        check(bool(NAME_RE.match(name)), f"unsafe file name {name!r}")
        entry = manifest["files"][name]
        check(isinstance(meta, dict) and meta.get("size") == entry["size"] and meta.get("sha256") == entry["sha256"],
              f"entry for {name!r} does not match {MANIFEST}")
        blob = meta.get("blob")
        check(isinstance(blob, dict) and isinstance(blob.get("name"), str) and bool(NAME_RE.match(blob["name"]))
              and blob["name"].endswith(".zst") and blob["name"] not in blobs, f"unsafe or duplicate blob name for {name!r}")
        blobs.add(blob["name"])
        digest = BLOB_DIGEST[version]
        check(_is_int(blob.get("size")) and blob["size"] >= 0 and is_sha256(blob.get(digest))
              and set(blob) == {"name", "size", digest}, f"malformed blob entry for {name!r}")
        sections = meta.get("sections")
        check(isinstance(sections, list), f"sections of {name!r} missing")
        total = compressed = 0
        for index, section in enumerate(sections):
            check(isinstance(section, dict) and _is_int(section.get("length")) and section["length"] > 0
                  and _is_int(section.get("planes")) and section["planes"] in (1, 2, 4, 8)
                  and section["length"] % section["planes"] == 0, f"malformed section in {name!r}")
            if "same_as" in section:
                check(version >= 2 and _is_same_as(section, sections[:index]),
                      f"section {index} of {name!r}: same_as must name an earlier stored section of the same length")
            else:
                check(isinstance(section.get("frames"), list) and _frames_fit(section, codec["chunk_bytes"], version),
                      f"frame list of a section in {name!r} does not fit its length")
            if "delta" in section:
                delta = section["delta"]
                check(base_id is not None and isinstance(section.get("tensor"), str) and isinstance(delta, dict)
                      and isinstance(delta.get("file"), str) and bool(NAME_RE.match(delta["file"]))
                      and isinstance(delta.get("dtype"), str) and isinstance(delta.get("shape"), list),
                      f"malformed delta section in {name!r}")
            total += section["length"]
            compressed += sum(section["frames"])
        check(total == entry["size"], f"sections of {name!r} cover {total} bytes, the file has {entry['size']}")
        check(compressed == blob["size"], f"frames of {name!r} add up to {compressed} bytes, its blob is {blob['size']}")
    return pack, manifest, manifest_raw


def _is_same_as(section: dict, earlier: list) -> bool:
    """A same_as section stores nothing and names an earlier stored (not same_as, not delta)
    section of its length: decoding it costs at most one more pass over that section."""
    target = section["same_as"]
    if not (_is_int(target) and 0 <= target < len(earlier)) or section.get("frames") != [] or "delta" in section:
        return False
    stored = earlier[target]
    return "same_as" not in stored and stored["length"] == section["length"] and "raw_chunks" not in section


def _frames_fit(section: dict, chunk_bytes: int, version: int) -> bool:
    """One frame per plane per chunk (one for a chunk in raw_chunks, compressed whole), each
    no larger than zstd's worst case for what it decodes to: no frame is read unbounded."""
    planes, frames, length = section["planes"], section["frames"], section["length"]
    chunks = math.ceil(length / chunk_bytes)
    whole = section.get("raw_chunks", [])
    if not (isinstance(whole, list) and (not whole or (version >= 2 and planes > 1))
            and all(_is_int(c) and 0 <= c < chunks for c in whole) and whole == sorted(set(whole))):
        return False
    if len(frames) != chunks * planes - len(whole) * (planes - 1) or not all(_is_int(f) and f > 0 for f in frames):
        return False
    position, whole = 0, set(whole)
    for chunk in range(chunks):
        count = 1 if chunk in whole else planes
        size = min(chunk_bytes, length - chunk * chunk_bytes) // count
        limit = size + size // 128 + 1024  # zstd's worst case is smaller
        if any(f > limit for f in frames[position:position + count]):
            return False
        position += count
    return True


def _verify_blobs(packed: Path, pack: dict) -> None:
    blobs = {meta["blob"]["name"]: meta["blob"] for meta in pack["files"].values()}
    for child in packed.iterdir():
        if child.is_symlink():
            raise CheckpointError(f"{child}: symbolic links are not allowed in a packed checkpoint")
        if child.name not in blobs and child.name not in (PACK, MANIFEST):
            raise CheckpointError(f"{child}: file not listed in {PACK} (extra file)")
    for name, blob in blobs.items():
        path = packed / name
        if not path.is_file() or path.is_symlink():
            raise CheckpointError(f"{path}: listed in {PACK} but missing")
        if path.stat().st_size != blob["size"]:
            raise CheckpointError(f"{path}: size {path.stat().st_size} does not match {PACK} ({blob['size']})")
        algorithm = BLOB_DIGEST[pack["format_version"]]
        if _file_digest(path, algorithm) != blob[algorithm]:
            name = {"sha256": "SHA-256", "blake3": "BLAKE3"}[algorithm]
            raise CheckpointError(f"{path}: {name} hash does not match {PACK} (modified or corrupt)")


# --------------------------------------------------------------------------- shared

class _Pipeline:
    """Run `submit`ted jobs on a thread pool, handing results to `finish` in submission order,
    with at most 2 x workers jobs (and IN_FLIGHT_BYTES of chunks) in flight: bounded memory."""

    def __init__(self, workers: int, chunk_bytes: int, finish):
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="bastion-pack")
        self.window = max(2, min(2 * workers, IN_FLIGHT_BYTES // chunk_bytes))
        self.finish, self.pending = finish, deque()

    def submit(self, tag: Any, fn, *args) -> None:
        self.pending.append((tag, self.pool.submit(fn, *args)))
        self._drain(self.window)

    def _drain(self, limit: int) -> None:
        while len(self.pending) > limit:
            tag, future = self.pending.popleft()
            self.finish(tag, *future.result())

    def __enter__(self) -> _Pipeline:
        return self

    def __exit__(self, exc_type, *_) -> None:
        try:
            if exc_type is None:
                self._drain(0)
        finally:
            for _, future in self.pending:
                future.cancel()
            self.pool.shutdown(wait=True)  # before the caller closes the files the jobs read


def _file_digest(path: Path, algorithm: str, chunk: int = 8 * 2**20) -> str:
    digest = HASHERS[algorithm]()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _pread(fd: int, offset: int, n: int, where: Any) -> bytes:
    parts, got = [], 0
    while got < n:
        block = os.pread(fd, n - got, offset + got)
        if not block:
            raise CheckpointError(f"{where}: file ended early (truncated while being read?)")
        parts.append(block)
        got += len(block)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _temp_dir(dst: Path) -> Path:
    if dst.exists() or dst.is_symlink():
        raise CheckpointError(f"{dst}: already exists; choose a new destination")
    if not dst.parent.exists():
        make_private_dir(dst.parent)
    tmp = dst.parent / f".tmp-{dst.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    make_private_dir(tmp)
    return tmp


def _commit(tmp: Path, dst: Path) -> None:
    fsync_dir(tmp)
    os.rename(tmp, dst)  # fails, rather than replaces, if something appeared at dst meanwhile
    fsync_dir(dst.parent)


def _threads(threads: int | None) -> int:
    if threads is not None and threads > 0:
        return threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _check_chunk_bytes(value: Any, what: str) -> None:
    if not (_is_int(value) and MIN_CHUNK_BYTES <= value <= MAX_CHUNK_BYTES and value % 8 == 0):
        raise CheckpointError(f"{what} must be a multiple of 8 in {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
