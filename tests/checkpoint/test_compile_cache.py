"""The compile cache's entries: sealed with a local HMAC key, verified before PyTorch reads a
byte of them, refused (a miss, not a crash) when unsigned, tampered, sealed by another key
or made for another build. No compile here: the artifacts are a real PyTorch mega-cache blob
whose one Inductor artifact is a pickle that creates a folder when unpickled - so a test can
see whether PyTorch deserialised it (tests/train/test_compile_cache_run.py compiles for real)."""
import hashlib
import json
import os
import pickle
import stat

import pytest
import torch

from bastion.checkpoint.compile_cache import (
    ARTIFACTS,
    KERNEL_PREFIX,
    SEAL,
    collect_kernels,
    CompileCache,
    CompileCacheRefused,
    entry_name,
    isolated,
    key_id,
    key_material,
    load_or_create_key,
    open_entry,
    open_entry_with_kernels,
    place_kernels,
    seal_entry,
)
from bastion.checkpoint.manifest import MANIFEST, build_manifest, manifest_bytes
from bastion.checkpoint.stores import LocalStore, S3Store
from bastion.errors import CheckpointError

MODEL = {"d_model": 32, "n_layer": 2, "vocab_size": 97}
OPTIONS = {"what": "train-step", "seq_len": 32}


class _Mkdir:
    """Unpickling this creates a folder: the proof that bytes reached pickle."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def canary_blob(marker) -> bytes:
    """A genuine torch.compiler cache blob (PyTorch's own serializer) holding one Inductor
    artifact that PyTorch unpickles as soon as load_cache_artifacts sees it."""
    from torch.compiler._cache import CacheArtifactManager

    CacheArtifactManager.clear()
    CacheArtifactManager._ensure_cache_artifacts_registered()
    CacheArtifactManager.record_artifact("inductor", "f" + "a" * 51, pickle.dumps(_Mkdir(marker)))
    blob, _ = torch.compiler.save_cache_artifacts()
    CacheArtifactManager.clear()
    return blob


@pytest.fixture
def material():
    return key_material(MODEL, OPTIONS, torch.device("cpu"))


@pytest.fixture
def key(tmp_path):
    return load_or_create_key(tmp_path / "conf" / "compile-cache.key")


def mode(path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# ---------------------------------------------------------------- the key
def test_key_is_created_private_once_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    first = load_or_create_key()
    path = tmp_path / "xdg" / "bastion" / "compile-cache.key"
    assert len(first) == 32 and mode(path) == 0o600 and mode(path.parent) == 0o700
    assert load_or_create_key() == first and load_or_create_key(path) == first
    assert first.hex() not in key_id(first) and len(key_id(first)) == 16


@pytest.mark.parametrize("problem", ["group-readable", "symlink", "not-a-key"])
def test_bad_key_files_are_refused(tmp_path, problem):
    path = tmp_path / "compile-cache.key"
    if problem == "symlink":
        real = tmp_path / "real.key"
        real.write_text("ab" * 32)
        real.chmod(0o600)
        path.symlink_to(real)
    else:
        path.write_text("ab" * 32 if problem == "group-readable" else "password123")
        path.chmod(0o640 if problem == "group-readable" else 0o600)
    with pytest.raises(CheckpointError, match={"group-readable": "chmod 600", "symlink": "cannot read",
                                               "not-a-key": "hex digits"}[problem]):
        load_or_create_key(path)


# ---------------------------------------------------------------- one entry
def test_sealed_entry_opens_to_its_bytes_and_is_private(tmp_path, key, material):
    entry = seal_entry(tmp_path / "entry", b"artifact bytes", material, key)
    assert open_entry(entry, key, material) == b"artifact bytes"
    assert mode(entry) == 0o700 and {mode(f) for f in entry.iterdir()} == {0o600}
    assert sorted(p.name for p in entry.iterdir()) == [MANIFEST, ARTIFACTS, SEAL]


KERNEL = "c" + "k2" * 26 + ".main.so"  # the shape of a name Inductor gives a built kernel library


def test_kernel_libraries_travel_sealed_and_land_where_inductor_looks(tmp_path, key, material):
    built = tmp_path / "inductor-a"
    (built / KERNEL[1:3]).mkdir(parents=True)
    (built / KERNEL[1:3] / KERNEL).write_bytes(b"\x7fELF kernel")
    (built / "fxgraph").mkdir()
    (built / "fxgraph" / "cnot.so").write_bytes(b"not a kernel folder")
    assert collect_kernels(built) == {KERNEL: b"\x7fELF kernel"}
    entry = seal_entry(tmp_path / "entry", b"artifact bytes", material, key, collect_kernels(built))
    artifacts, kernels = open_entry_with_kernels(entry, key, material)
    assert artifacts == b"artifact bytes" and kernels == {KERNEL: b"\x7fELF kernel"}
    place_kernels(tmp_path / "inductor-b", kernels)
    placed = tmp_path / "inductor-b" / KERNEL[1:3] / KERNEL
    assert placed.read_bytes() == b"\x7fELF kernel" and mode(placed) == 0o600 and mode(placed.parent) == 0o700

    (entry / (KERNEL_PREFIX + KERNEL)).write_bytes(b"\x7fELF kernez")  # a swapped library, manifest fixed too
    _rewrite_manifest(entry)
    with pytest.raises(CompileCacheRefused, match="not the ones sealed"):
        open_entry(entry, key, material)


def test_a_kernel_name_that_is_not_inductors_is_refused(tmp_path, key, material):
    entry = seal_entry(tmp_path / "entry", b"artifact bytes", material, key, {KERNEL: b"lib"})
    (entry / (KERNEL_PREFIX + KERNEL)).rename(entry / (KERNEL_PREFIX + "libc.so"))
    _rewrite_manifest(entry)
    with pytest.raises(CompileCacheRefused, match="not a compile-cache entry"):
        open_entry(entry, key, material)
    with pytest.raises(CompileCacheRefused, match="not a kernel library name"):
        place_kernels(tmp_path / "inductor", {"../../evil.so": b"lib"})


def _rewrite_manifest(entry):
    files = {p.name: p.read_bytes() for p in entry.iterdir() if p.name != MANIFEST}
    (entry / MANIFEST).write_bytes(manifest_bytes(build_manifest(files)))


def test_tampered_artifacts_are_refused_with_or_without_a_matching_manifest(tmp_path, key, material):
    entry = seal_entry(tmp_path / "entry", b"artifact bytes", material, key)
    (entry / ARTIFACTS).write_bytes(b"artifact bytez")
    with pytest.raises(CompileCacheRefused, match="SHA-256 does not match"):
        open_entry(entry, key, material)
    _rewrite_manifest(entry)  # a forger who fixes the manifest too
    with pytest.raises(CompileCacheRefused, match="not the ones sealed"):
        open_entry(entry, key, material)


def test_an_edited_seal_fails_its_hmac(tmp_path, key, material):
    entry = seal_entry(tmp_path / "entry", b"artifact bytes", material, key)
    seal = json.loads((entry / SEAL).read_bytes())
    seal["artifacts"] = {"size": 5, "sha256": hashlib.sha256(b"other").hexdigest()}
    (entry / SEAL).write_bytes(json.dumps(seal).encode())
    (entry / ARTIFACTS).write_bytes(b"other")
    _rewrite_manifest(entry)
    with pytest.raises(CompileCacheRefused, match="HMAC does not match"):
        open_entry(entry, key, material)


def test_an_entry_sealed_by_another_key_is_refused(tmp_path, key, material):
    other = load_or_create_key(tmp_path / "other.key")
    entry = seal_entry(tmp_path / "entry", b"artifact bytes", material, other)
    with pytest.raises(CompileCacheRefused, match="sealed by another key"):
        open_entry(entry, key, material)
    seal = json.loads((entry / SEAL).read_bytes())
    seal["key_id"] = key_id(key)  # claiming to be ours does not make the HMAC ours
    (entry / SEAL).write_bytes(json.dumps(seal).encode())
    _rewrite_manifest(entry)
    with pytest.raises(CompileCacheRefused, match="HMAC does not match"):
        open_entry(entry, key, material)


def test_unsigned_entry_and_missing_manifest_are_refused(tmp_path, key, material):
    entry = seal_entry(tmp_path / "entry", b"artifact bytes", material, key)
    seal = json.loads((entry / SEAL).read_bytes())
    del seal["hmac"]
    (entry / SEAL).write_bytes(json.dumps(seal).encode())
    _rewrite_manifest(entry)
    with pytest.raises(CompileCacheRefused, match="malformed seal"):
        open_entry(entry, key, material)
    (entry / MANIFEST).unlink()
    with pytest.raises(CompileCacheRefused, match="no MANIFEST.json"):
        open_entry(entry, key, material)


def test_a_seal_with_a_non_finite_number_is_refused_not_a_crash(tmp_path, key, material):
    entry = seal_entry(tmp_path / "entry", b"artifact bytes", material, key)
    (entry / SEAL).write_bytes((entry / SEAL).read_bytes().replace(b'"material":{', b'"material":{"x":NaN,'))
    _rewrite_manifest(entry)
    with pytest.raises(CompileCacheRefused, match="non-finite|malformed"):
        open_entry(entry, key, material)


def test_an_extra_file_in_an_entry_is_refused(tmp_path, key, material):
    entry = seal_entry(tmp_path / "entry", b"artifact bytes", material, key)
    (entry / "payload.py").write_text("import os")
    with pytest.raises(CompileCacheRefused, match="not listed"):
        open_entry(entry, key, material)


@pytest.mark.parametrize("field,value", [("torch", "2.0.0"), ("model", {**MODEL, "d_model": 64}),
                                         ("device", "cuda:NVIDIA H100:sm_90:cuda-12.8"),
                                         ("compile", {**OPTIONS, "seq_len": 64})])
def test_an_entry_for_another_build_is_refused_and_named_apart(tmp_path, key, material, field, value):
    theirs = {**material, field: value}
    assert entry_name(theirs) != entry_name(material)  # looked up by key: a plain miss
    entry = seal_entry(tmp_path / "entry", b"artifact bytes", theirs, key)  # copied over ours: refused
    with pytest.raises(CompileCacheRefused, match=f"another build \\(differs in: {field}\\)"):
        open_entry(entry, key, material)


# ---------------------------------------------------------------- through a store, up to PyTorch
def test_verified_entry_reaches_pytorch_refused_ones_never_do(tmp_path, key, material):
    """The positive control first: a correctly sealed blob is unpickled by PyTorch (the
    marker appears) - so an entry's artifacts are code. Then the same blob, tampered or
    sealed by another key, leaves no marker, and the run carries on."""
    root = tmp_path / "cache"
    ours = CompileCache(LocalStore(root), key, material)
    with isolated():
        ours.store.push_folder(seal_entry(tmp_path / "good", canary_blob(tmp_path / "ran-good"), material, key),
                               ours.name, lambda d: None)
        event = ours.load()
    assert (tmp_path / "ran-good").is_dir(), event  # PyTorch read the verified bytes
    assert event.kind == "refused" and "PyTorch could not read" in event.detail  # (a canary is no graph)

    other = load_or_create_key(tmp_path / "other.key")
    bad = seal_entry(tmp_path / "bad", canary_blob(tmp_path / "ran-other-key"), material, other)
    LocalStore(root).push_folder(bad, ours.name, lambda d: None)
    fresh = CompileCache(LocalStore(root), key, material)
    with isolated() as inductor_dir:
        event = fresh.load(inductor_dir)
        assert list(inductor_dir.iterdir()) == []  # nothing written where Inductor looks
    assert event.kind == "refused" and "another key" in event.detail
    assert not (tmp_path / "ran-other-key").exists()

    entry = root / ours.name
    blob = bytearray((entry / ARTIFACTS).read_bytes())
    blob[-20:] = pickle.dumps(_Mkdir(tmp_path / "ran-tampered"))[-20:]
    (entry / ARTIFACTS).write_bytes(bytes(blob))
    with isolated():
        event = CompileCache(LocalStore(root), key, material).load()
    assert event.kind == "refused" and "SHA-256" in event.detail
    assert not (tmp_path / "ran-tampered").exists()
    for cache in (ours, fresh):
        cache.close()


def test_miss_then_save_then_hit_in_a_private_folder(tmp_path, key, material):
    """With nothing compiled yet save() has nothing to seal; with artifacts (a real blob put
    into PyTorch's cache manager) it seals and pushes; a second cache finds them."""
    root = tmp_path / "cache"
    cache = CompileCache.open(str(root), material, key_path=tmp_path / "conf" / "compile-cache.key")
    assert mode(root) == 0o700
    assert cache.load().kind == "miss"
    from torch.compiler._cache import CacheArtifactManager

    CacheArtifactManager.clear()
    assert cache.save() is None  # nothing compiled: nothing sealed
    CacheArtifactManager._ensure_cache_artifacts_registered()
    CacheArtifactManager.record_artifact("autotune", "k" * 20, {"num_warps": 4})
    try:
        event = cache.save()
        assert event.kind == "saved", event
        assert cache.save() is None  # once per process
    finally:
        CacheArtifactManager.clear()
    entry = root / cache.name
    assert mode(entry) == 0o700 and {mode(f) for f in entry.iterdir()} == {0o600}
    assert open_entry(entry, key, material)  # sealed by the key at key_path
    cache.close()
    assert not cache.workdir.exists()


def test_a_broken_location_or_key_is_an_error_naming_it(tmp_path, material):
    with pytest.raises(CheckpointError, match="unsupported store URL scheme"):
        CompileCache.open("ftp://host/x", material, key_path=tmp_path / "k")
    bad_key = tmp_path / "bad.key"
    bad_key.write_text("00" * 32)
    bad_key.chmod(0o644)
    with pytest.raises(CheckpointError, match="open to group or others"):
        CompileCache.open(str(tmp_path / "cache"), material, key_path=bad_key)


def test_entries_round_trip_through_s3_and_tampering_there_is_refused(s3, tmp_path, key, material):
    store = S3Store(s3.bucket, s3.prefix, endpoint_url=s3.endpoint, allow_http=True)
    name = entry_name(material)
    store.push_folder(seal_entry(tmp_path / "entry", b"artifact bytes", material, key), name, lambda d: None)
    cache = CompileCache(store, key, material)
    assert store.has(name) and not store.has("0" * 64)
    pulled = store.pull(name, tmp_path / "pulled" / name, verify=lambda d: {"files": {}})
    assert open_entry(pulled, key, material) == b"artifact bytes"
    s3.client().put_object(Bucket=s3.bucket, Key=f"{s3.prefix}/{name}/{ARTIFACTS}", Body=b"artifact bytez")
    with isolated():
        event = cache.load()
    assert event.kind == "refused" and "SHA-256" in event.detail
    cache.close()
