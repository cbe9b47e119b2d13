"""A persistent torch.compile cache whose artifacts are signed: they are code.

`torch.compiler.save_cache_artifacts()` serialises what a compile produced (Inductor's
generated code, AOTAutograd's graphs, autotuning results) into one blob, and
`load_cache_artifacts(blob)` puts it back so the next process's compile hits those caches
instead of re-tracing, re-lowering and re-tuning. PyTorch reads that blob with pickle and
then imports the Python it contains: whoever can write a cache entry runs code in every run
that loads it. So an entry is only ever handed to PyTorch after two checks:

    MANIFEST.json   the checkpoint manifest (`manifest.py`, the one reader): size and
                    SHA-256 of `artifacts.torchcache` and `seal.json`, nothing else allowed
    seal.json       what the artifacts are for (the cache key's material: torch and Python
                    versions, device, model config, compile options), their size and
                    SHA-256, and an HMAC-SHA256 over all of it under a local secret key

The key (32 random bytes, hex, in a 0600 file created on first use; by default
`$XDG_CONFIG_HOME/bastion/compile-cache.key`) lives on the machines that compile, never in
configs, logs or the store: an entry someone wrote into the store without the key, an entry
edited after it was sealed, and an entry sealed by another machine's key are all refused.
A refusal is a cache miss with a reason: the run compiles from scratch and seals a new entry.

Entries live in a checkpoint store (`stores.py`): a local folder (kept 0700, entries 0600)
or `s3://bucket/prefix`, one entry per cache key, named by the key's SHA-256. A key whose
material differs (another torch, device, model or compile option) names another entry, so
it is a miss, not an error; an entry whose sealed material is not this run's is refused.

While a cache is in use, Inductor's own on-disk cache is pointed at a private temporary
folder (removed afterwards): PyTorch then reads no compiled code but what was verified here,
never a shared /tmp/torchinductor_<user> left by another process.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import platform
import re
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bastion.checkpoint.manifest import build_manifest, manifest_bytes, read_manifest_bytes, verify_directory
from bastion.checkpoint.stores import Store, open_store
from bastion.errors import CheckpointError
from bastion.safeio import is_sha256, make_private_dir, parse_json, read_regular, write_bytes, write_dir_atomic

ARTIFACTS = "artifacts.torchcache"  # not a pickle suffix: the manifest reader refuses those by name
SEAL = "seal.json"
SEAL_FORMAT = "bastion-compile-cache"
SEAL_VERSION = 1
ENTRY_FILES = frozenset({ARTIFACTS, SEAL})
KERNEL_PREFIX = "kernel."  # + the file name of a C++ kernel library Inductor built (CPU)
# Inductor keeps a built kernel at <cache>/<name[1:3]>/<name>; name = "c" + a base32 hash.
KERNEL_NAME = re.compile(r"c[a-z0-9]{40,80}(\.main)?\.so")
MAX_KERNELS = 10_000
MAX_ARTIFACT_BYTES = 4 * 2**30
MAX_SEAL_BYTES = 1 * 2**20
KEY_BYTES = 32
KEY_FILE = "compile-cache.key"
_MAC_CONTEXT = b"bastion compile-cache seal v1\x00"  # domain separation: this key signs nothing else
_KEY_ID_CONTEXT = b"bastion compile-cache key id\x00"


class CompileCacheRefused(CheckpointError):
    """An entry that is not handed to PyTorch (unsigned, tampered, another key, another
    build); the caller compiles from scratch."""


# ---------------------------------------------------------------- the key
def default_key_path() -> Path:
    """$XDG_CONFIG_HOME/bastion/compile-cache.key (~/.config/... by default): per user, out of
    every project folder, config and store."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "bastion" / KEY_FILE


def load_or_create_key(path: str | Path | None = None) -> bytes:
    """The HMAC key at `path`, created (0600, in a 0700 folder) on first use. Refused: a key
    file others can read or write, not owned by this user, a link, or not 64 hex digits."""
    path = Path(path) if path is not None else default_key_path()
    if not path.exists() and not path.is_symlink():
        _create_key(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the compile-cache key ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{path}: the compile-cache key is not a regular file")
        if info.st_uid != os.getuid():
            raise CheckpointError(f"{path}: the compile-cache key belongs to another user (uid {info.st_uid})")
        if info.st_mode & 0o077:
            raise CheckpointError(f"{path}: the compile-cache key is open to group or others "
                                  f"(mode {stat.S_IMODE(info.st_mode):o}); run chmod 600 on it")
        text = fh.read(4 * KEY_BYTES).decode("ascii", errors="replace").strip()
    if len(text) != 2 * KEY_BYTES or any(c not in "0123456789abcdef" for c in text):
        raise CheckpointError(f"{path}: not a compile-cache key ({2 * KEY_BYTES} lower-case hex digits)")
    return bytes.fromhex(text)


def _create_key(path: Path) -> None:
    make_private_dir(path.parent)
    try:  # O_EXCL: two runs starting at once end up with the one key the first wrote
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fd, 0o600)
        fh.write((secrets.token_hex(KEY_BYTES) + "\n").encode())
        fh.flush()
        os.fsync(fd)


def key_id(key: bytes) -> str:
    """A short name for a key that reveals nothing of it: which key sealed an entry."""
    return hmac.new(key, _KEY_ID_CONTEXT, hashlib.sha256).hexdigest()[:16]


# ---------------------------------------------------------------- what an entry is for
def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def device_description(device: torch.device) -> str:
    """What compiled code depends on about the device: the GPU model and compute capability
    (and CUDA version), or the CPU's architecture and the vector ISA Inductor generates for."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"cuda:{torch.cuda.get_device_name(index)}:sm_{major}{minor}:cuda-{torch.version.cuda}"
    if device.type == "cpu":
        return f"cpu:{platform.machine()}:{torch.backends.cpu.get_cpu_capability()}"
    return device.type


def key_material(model: dict[str, Any], compile_options: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Everything an entry's artifacts were compiled for; two runs share an entry only when
    all of it is equal."""
    return {"torch": torch.__version__, "python": platform.python_version(), "device": device_description(device),
            "model": model, "compile": compile_options}


def entry_name(material: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(material)).hexdigest()


def _mac(key: bytes, unsigned_seal: dict[str, Any]) -> str:
    return hmac.new(key, _MAC_CONTEXT + canonical_json(unsigned_seal), hashlib.sha256).hexdigest()


# ---------------------------------------------------------------- writing and checking an entry
def _described(data: bytes) -> dict[str, Any]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def seal_entry(directory: Path, artifacts: bytes, material: dict[str, Any], key: bytes,
               kernels: dict[str, bytes] | None = None) -> Path:
    """Write an entry folder (0700, files 0600, atomically): the artifacts, the C++ kernel
    libraries Inductor built for them on CPU (`kernels`: file name -> bytes), their seal,
    the manifest."""
    kernels = kernels or {}
    seal = {"format": SEAL_FORMAT, "version": SEAL_VERSION, "key_id": key_id(key), "material": material,
            "artifacts": _described(artifacts), "kernels": {name: _described(data) for name, data in kernels.items()}}
    seal["hmac"] = _mac(key, seal)
    files: dict[str, bytes] = {ARTIFACTS: artifacts, SEAL: canonical_json(seal)}
    files.update({KERNEL_PREFIX + name: data for name, data in kernels.items()})
    files["MANIFEST.json"] = manifest_bytes(build_manifest(files))
    return write_dir_atomic(directory, files, replace=True)


def check_layout(directory: Path) -> dict[str, Any]:
    """An entry's shape against its manifest, without the key: the artifacts, the seal and
    kernel libraries named as Inductor names them, each of the listed size and SHA-256, no
    links, nothing else. Returns the manifest (what a store's
    pull verifies a download with)."""
    manifest, _ = read_manifest_bytes(directory)
    files = manifest["files"]
    kernels = [name for name in files if name.startswith(KERNEL_PREFIX)]
    if set(files) - set(kernels) != ENTRY_FILES or len(kernels) > MAX_KERNELS or not all(
            KERNEL_NAME.fullmatch(name[len(KERNEL_PREFIX):]) for name in kernels):
        raise CompileCacheRefused(f"{directory}: not a compile-cache entry (its manifest lists "
                                  f"{sorted(files)[:4]}, expected {sorted(ENTRY_FILES)} and kernel.*.so files)")
    if sum(entry["size"] for entry in files.values()) > MAX_ARTIFACT_BYTES or files[SEAL]["size"] > MAX_SEAL_BYTES:
        raise CompileCacheRefused(f"{directory}: entry over the size limits ({MAX_ARTIFACT_BYTES} bytes in all, "
                                  f"{MAX_SEAL_BYTES} of seal)")
    verify_directory(directory, manifest)
    return manifest


def open_entry(directory: Path, key: bytes, material: dict[str, Any]) -> bytes:
    """The artifacts of the entry at `directory`, verified for this key and this build: the
    returned bytes are the very bytes whose SHA-256 the signed seal names. Raises
    CompileCacheRefused (a CheckpointError) saying why otherwise."""
    return open_entry_with_kernels(directory, key, material)[0]


def open_entry_with_kernels(directory: Path, key: bytes, material: dict[str, Any]) -> tuple[bytes, dict[str, bytes]]:
    """`open_entry`, and the entry's kernel libraries (file name -> bytes), each the bytes
    whose SHA-256 the seal names."""
    try:
        manifest = check_layout(directory)
    except CheckpointError as exc:
        raise CompileCacheRefused(f"unverifiable entry: {exc}") from None
    seal = _read_seal(directory, manifest)
    if seal["key_id"] != key_id(key):
        raise CompileCacheRefused(f"{directory}: sealed by another key (key id {seal['key_id']}, this machine's is "
                                  f"{key_id(key)})")
    unsigned = {k: v for k, v in seal.items() if k != "hmac"}
    try:
        expected = _mac(key, unsigned)
    except ValueError:  # NaN or Infinity somewhere: never written by seal_entry
        raise CompileCacheRefused(f"{directory / SEAL}: malformed seal (non-finite number)") from None
    if not hmac.compare_digest(seal["hmac"], expected):
        raise CompileCacheRefused(f"{directory}: seal's HMAC does not match (the entry was altered after sealing)")
    if seal["material"] != material:
        differing = sorted(k for k in set(material) | set(seal["material"])
                           if seal["material"].get(k) != material.get(k))
        raise CompileCacheRefused(f"{directory}: compiled for another build (differs in: {', '.join(differing)})")
    sealed = {ARTIFACTS: seal["artifacts"], **{KERNEL_PREFIX + name: d for name, d in seal["kernels"].items()}}
    listed = {name: {"size": e["size"], "sha256": e["sha256"]} for name, e in manifest["files"].items() if name != SEAL}
    if sealed != listed:
        raise CompileCacheRefused(f"{directory}: the manifest's files are not the ones sealed")
    data = {name: _read_sealed(directory / name, entry) for name, entry in sealed.items()}
    return data.pop(ARTIFACTS), {name[len(KERNEL_PREFIX):]: blob for name, blob in data.items()}


def _read_sealed(path: Path, entry: dict[str, Any]) -> bytes:
    data = read_regular(path, entry["size"], CompileCacheRefused)
    if _described(data) != entry:
        raise CompileCacheRefused(f"{path}: changed while being read")
    return data


def _read_seal(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    entry = manifest["files"][SEAL]
    raw = read_regular(directory / SEAL, MAX_SEAL_BYTES, CompileCacheRefused)
    if hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise CompileCacheRefused(f"{directory / SEAL}: SHA-256 does not match the manifest")
    seal = parse_json(raw, CompileCacheRefused, f"{directory / SEAL}")
    if not isinstance(seal, dict) or seal.get("format") != SEAL_FORMAT or seal.get("version") != SEAL_VERSION:
        raise CompileCacheRefused(f"{directory / SEAL}: not a version-{SEAL_VERSION} {SEAL_FORMAT} seal")
    kernels = seal.get("kernels")
    well_formed = (isinstance(seal.get("key_id"), str) and is_sha256(seal.get("hmac"))
                   and isinstance(seal.get("material"), dict) and _is_description(seal.get("artifacts"))
                   and isinstance(kernels, dict) and all(_is_description(d) for d in kernels.values()))
    if not well_formed or set(seal) != {"format", "version", "key_id", "material", "artifacts", "kernels", "hmac"}:
        raise CompileCacheRefused(f"{directory / SEAL}: malformed seal (unsigned entry?)")
    return seal


def _is_description(value: Any) -> bool:
    return (isinstance(value, dict) and set(value) == {"size", "sha256"} and type(value["size"]) is int
            and value["size"] >= 0 and is_sha256(value["sha256"]))


def collect_kernels(inductor_dir: Path) -> dict[str, bytes]:
    """The C++ kernel libraries Inductor built in its (private) cache folder, by file name."""
    found: dict[str, bytes] = {}
    for path in sorted(inductor_dir.glob("??/*.so")):
        if KERNEL_NAME.fullmatch(path.name) and path.parent.name == path.name[1:3] and not path.is_symlink():
            found[path.name] = read_regular(path, MAX_ARTIFACT_BYTES, CheckpointError)
        if len(found) >= MAX_KERNELS:
            break
    return found


def place_kernels(inductor_dir: Path, kernels: dict[str, bytes]) -> None:
    """Put verified kernel libraries where Inductor looks for them before compiling one."""
    for name, data in kernels.items():
        if not KERNEL_NAME.fullmatch(name):  # (names were checked with the layout; never a path)
            raise CompileCacheRefused(f"{name!r:.80}: not a kernel library name")
        folder = inductor_dir / name[1:3]
        make_private_dir(folder)
        target = folder / name
        if not target.exists():
            write_bytes(target, data)


# ---------------------------------------------------------------- a cache in use
@dataclass
class CacheEvent:
    """What happened, for the run's log: `hit`, `miss`, `refused`, `saved`, `failed`."""

    kind: str
    detail: str


@dataclass
class CompileCache:
    """One run's use of a cache location for one key: `load()` before the first compiled call,
    `save()` once compiles happened, `close()` at the end (inside `isolated()`, which gives
    Inductor a private on-disk cache for the duration)."""

    store: Store
    key: bytes
    material: dict[str, Any]
    max_bytes: int = MAX_ARTIFACT_BYTES
    saved: bool = False  # one save per process (see `save`)
    loaded_keys: frozenset[tuple[str, str]] = frozenset()
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="bastion-compile-cache-")))

    @classmethod
    def open(cls, location: str, material: dict[str, Any], *, key_path: str | Path | None = None,
             endpoint_url: str | None = None, allow_http: bool = False) -> "CompileCache":
        """`location`: a local folder (created 0700) or a store URL (s3://bucket/prefix,
        file:///abs/path). Raises CheckpointError for a bad location or key file."""
        store = open_store(location, endpoint_url=endpoint_url, allow_http=allow_http)
        return cls(store, load_or_create_key(key_path), material)

    @property
    def name(self) -> str:
        return entry_name(self.material)

    def load(self, inductor_dir: Path | None = None) -> CacheEvent:
        """Pull this key's entry, verify it, and only then hand it to PyTorch (its kernel
        libraries go into `inductor_dir`, Inductor's private cache folder). Never raises for
        what the store holds: a missing, refused or unreadable entry is reported, and the
        compile simply starts cold."""
        try:
            if not self.store.has(self.name):
                return CacheEvent("miss", f"no entry {self.name[:16]} in {self.store}")
            local = self.store.pull(self.name, self.workdir / f"pulled-{self.name}", self.max_bytes + MAX_SEAL_BYTES,
                                    verify=check_layout)
            data, kernels = open_entry_with_kernels(local, self.key, self.material)
            if inductor_dir is not None:
                place_kernels(inductor_dir, kernels)
        except CompileCacheRefused as exc:
            return CacheEvent("refused", str(exc))
        except (CheckpointError, OSError) as exc:
            return CacheEvent("refused", f"entry {self.name[:16]} not loaded: {exc}")
        try:
            info = torch.compiler.load_cache_artifacts(data)
        except Exception as exc:  # noqa: BLE001 - PyTorch's own loader failing must not end the run
            info, why = None, f"{type(exc).__name__}: {str(exc)[:200]}"
        else:
            why = "another PyTorch build?"
        if info is None:
            return CacheEvent("refused", f"PyTorch could not read the verified artifacts ({why})")
        self.loaded_keys = _keys(info)  # compiling from them records them again: nothing new to save
        return CacheEvent("hit", f"loaded {len(self.loaded_keys)} artifacts ({len(data):,} bytes) and "
                                 f"{len(kernels)} kernel libraries from entry {self.name[:16]} in {self.store}")

    def save(self, inductor_dir: Path | None = None) -> CacheEvent | None:
        """Seal and push what this process compiled (and the kernel libraries Inductor built
        in `inductor_dir`); None when it compiled nothing the loaded entry did not hold, or
        when this process already saved. Once per process: PyTorch's serializer appends each
        save's artifacts to the last, and its loader keeps only the last batch of each kind,
        so a second save would make an entry that loads half its graphs."""
        if self.saved:
            return None
        result = torch.compiler.save_cache_artifacts()
        if result is None or _keys(result[1]) <= self.loaded_keys:
            return None
        data, info = result
        self.saved = True
        try:
            kernels = collect_kernels(inductor_dir) if inductor_dir is not None else {}
            entry = seal_entry(self.workdir / f"sealed-{self.name}", data, self.material, self.key, kernels)
            self.store.push_folder(entry, self.name, check_layout)
        except (CheckpointError, OSError) as exc:
            return CacheEvent("failed", f"could not save the compile cache to {self.store}: {exc}")
        return CacheEvent("saved", f"sealed {len(_keys(info))} artifacts ({len(data):,} bytes) and "
                                   f"{len(kernels)} kernel libraries as entry {self.name[:16]} in {self.store}")

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _keys(info: Any) -> frozenset[tuple[str, str]]:
    return frozenset((kind, key) for kind, keys in info.artifacts.items() for key in keys)


class isolated:
    """Inductor's on-disk cache in a private temporary folder for the block (0700, removed
    after): compiled code comes only from a verified entry or a fresh compile."""

    def __enter__(self) -> Path:
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

        self.folder = Path(tempfile.mkdtemp(prefix="bastion-inductor-"))
        self._context = temporary_cache_dir(str(self.folder))
        self._context.__enter__()
        return self.folder

    def __exit__(self, *exc: Any) -> None:
        try:
            self._context.__exit__(*exc)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


__all__ = ["ARTIFACTS", "KERNEL_PREFIX", "SEAL", "collect_kernels", "open_entry_with_kernels", "place_kernels", "CacheEvent", "CompileCache", "CompileCacheRefused", "check_layout",
           "default_key_path", "device_description", "entry_name", "isolated", "key_id", "key_material",
           "load_or_create_key", "open_entry", "seal_entry"]
