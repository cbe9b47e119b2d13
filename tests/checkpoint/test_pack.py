import hashlib
import json
import os
import stat

import blake3
import pytest
import safetensors.torch
import torch
import zstandard

from bastion.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from bastion.checkpoint import pack as pack_mod
from bastion.checkpoint.manifest import MANIFEST, build_manifest, manifest_bytes
from bastion.checkpoint.pack import (
    PACK,
    pack_checkpoint,
    unpack_checkpoint,
    verify_packed,
)
from bastion.errors import CheckpointError
from bastion.safeio import make_private_dir, write_bytes

SMALL_CHUNK = 4096  # many chunks per tensor, so the chunk/plane bookkeeping is exercised


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fp32": torch.randn(64, 96, generator=g) * 0.02,
        "bf16": (torch.randn(128, 40, generator=g) * 0.02).bfloat16(),
        "fp16": (torch.randn(3001, generator=g) * 0.02).half(),  # odd element count: a ragged last chunk
        "int64": torch.randint(-(2**40), 2**40, (700,), generator=g),
        "empty": torch.zeros(0, 5),
        "scalar": torch.tensor(1.5),
        "small": torch.arange(7.0),
    }


def save(root, step, tensors, **extra):
    ckpt = Checkpoint(model=tensors, trainer_state={"step": step}, config_yaml="a: 1\n", tokenizer_json="{}", **extra)
    return save_checkpoint(root, step, ckpt)


def contents(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def rewrite_pack(packed, edit):
    data = json.loads((packed / PACK).read_text())
    edit(data)
    (packed / PACK).write_text(json.dumps(data))


def test_round_trip_is_bit_exact(tmp_path):
    tensors = model()
    src = save(tmp_path / "run", 5, tensors, optimizer={"state.0.exp_avg": torch.randn(50, 50)},
               optimizer_meta={"class": "AdamW"}, rng={"torch_cpu": torch.get_rng_state()})
    report = pack_checkpoint(src, tmp_path / "packed", chunk_bytes=SMALL_CHUNK, threads=2)
    assert report.original_bytes == sum(p.stat().st_size for p in src.iterdir() if p.name != MANIFEST)
    assert set(report.files) == {"model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                 "trainer_state.json", "config.yaml", "tokenizer.json"}
    assert report.packed_bytes > 0 and report.ratio > 0 and report.mb_per_s > 0
    assert (tmp_path / "packed" / MANIFEST).read_bytes() == (src / MANIFEST).read_bytes()
    assert verify_packed(tmp_path / "packed")["format"] == "bastion-pack"

    out = unpack_checkpoint(tmp_path / "packed", tmp_path / "restored" / "step_00000005")
    assert contents(out) == contents(src)
    loaded = load_checkpoint(out)
    for name, tensor in tensors.items():
        assert loaded.model[name].dtype == tensor.dtype and torch.equal(loaded.model[name], tensor), name
    assert not list((tmp_path / "restored").glob(".tmp-*"))


def test_planes_follow_dtype(tmp_path):
    src = save(tmp_path, 1, model())
    pack_checkpoint(src, tmp_path / "p", chunk_bytes=SMALL_CHUNK)
    sections = json.loads((tmp_path / "p" / PACK).read_text())["files"]["model.safetensors"]["sections"]
    planes = {s["tensor"]: s["planes"] for s in sections if "tensor" in s}
    assert planes == {"fp32": 4, "bf16": 2, "fp16": 2}  # int64 and tiny tensors stay in plain sections


def test_permissions_owner_only(tmp_path):
    src = save(tmp_path / "run", 1, model())
    packed = tmp_path / "new" / "packed"
    pack_checkpoint(src, packed)
    out = unpack_checkpoint(packed, tmp_path / "out")
    for directory in (packed, packed.parent, out):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700, directory
        for child in directory.iterdir():
            if child.is_file():
                assert stat.S_IMODE(os.stat(child).st_mode) == 0o600, child


def test_delta_round_trip(tmp_path):
    base_tensors = model(0)
    new = {k: v.clone() for k, v in base_tensors.items()}
    new["fp32"] += 1e-5 * torch.randn_like(new["fp32"])  # a small update: low mantissa bits change
    new["bf16"][:3] += 0.01
    new["int64"][::7] += 1
    new["fp16"] = new["fp16"][:2000].clone()  # shape changed: stored without delta
    new["added"] = torch.randn(40, 40)  # absent in base: stored without delta
    base = save(tmp_path / "run", 1, base_tensors)
    src = save(tmp_path / "run", 2, new)
    report = pack_checkpoint(src, tmp_path / "delta", base=base, chunk_bytes=SMALL_CHUNK)
    assert report.files["model.safetensors"].delta_tensors == 3  # fp32, bf16, int64
    pack = json.loads((tmp_path / "delta" / PACK).read_text())
    assert pack["base_manifest_sha256"] == hashlib.sha256((base / MANIFEST).read_bytes()).hexdigest()

    out = unpack_checkpoint(tmp_path / "delta", tmp_path / "out", base=base)
    assert contents(out) == contents(src)


def test_delta_of_unchanged_checkpoint_is_tiny(tmp_path):
    tensors = {"w": torch.randn(512, 512) * 0.02, "b": (torch.randn(256, 256) * 0.02).bfloat16()}
    base = save(tmp_path / "a", 1, tensors)
    same = save(tmp_path / "b", 1, tensors)
    report = pack_checkpoint(same, tmp_path / "delta", base=base)
    assert report.packed_bytes < 0.02 * report.original_bytes, report.as_dict()
    out = unpack_checkpoint(tmp_path / "delta", tmp_path / "out", base=base)
    assert contents(out) == contents(same)


def test_delta_against_wrong_or_missing_base_refused(tmp_path):
    base = save(tmp_path / "run", 1, model(0))
    other = save(tmp_path / "other", 1, model(1))
    src = save(tmp_path / "run", 2, model(2))
    pack_checkpoint(src, tmp_path / "delta", base=base)
    want = hashlib.sha256((base / MANIFEST).read_bytes()).hexdigest()
    got = hashlib.sha256((other / MANIFEST).read_bytes()).hexdigest()
    with pytest.raises(CheckpointError, match="wrong base") as err:
        unpack_checkpoint(tmp_path / "delta", tmp_path / "out", base=other)
    assert want in str(err.value) and got in str(err.value)
    with pytest.raises(CheckpointError, match="pass that checkpoint as base"):
        unpack_checkpoint(tmp_path / "delta", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_delta_matches_tensors_across_reshaped_shards(tmp_path):
    """Tensors are matched by name within model-*.safetensors, whatever shard they sit in."""
    def write_ckpt(directory, files):
        make_private_dir(directory)
        for name, data in files.items():
            write_bytes(directory / name, data)
        write_bytes(directory / MANIFEST, manifest_bytes(build_manifest(files)))
        return directory

    a, b = torch.randn(100, 100), torch.randn(50, 100)
    base = write_ckpt(tmp_path / "base", {"model-00001-of-00001.safetensors": safetensors.torch.save({"a": a, "b": b})})
    new = write_ckpt(tmp_path / "new", {
        "model-00001-of-00002.safetensors": safetensors.torch.save({"a": a + 1e-6}),
        "model-00002-of-00002.safetensors": safetensors.torch.save({"b": b}),
    })
    report = pack_checkpoint(new, tmp_path / "p", base=base)
    assert sum(f.delta_tensors for f in report.files.values()) == 2
    assert report.files["model-00002-of-00002.safetensors"].packed_bytes < 1000
    out = unpack_checkpoint(tmp_path / "p", tmp_path / "out", base=base)
    assert contents(out) == contents(new)


def test_tampered_blob_refused_before_decompressing(tmp_path, monkeypatch):
    src = save(tmp_path, 1, model())
    packed = tmp_path / "p"
    pack_checkpoint(src, packed)
    blob = packed / "model.safetensors.zst"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    calls = []
    monkeypatch.setattr(pack_mod, "_decompress", lambda *a: calls.append(a))
    with pytest.raises(CheckpointError, match="model.safetensors.zst: BLAKE3 hash does not match"):
        verify_packed(packed)
    with pytest.raises(CheckpointError, match="model.safetensors.zst: BLAKE3 hash does not match"):
        unpack_checkpoint(packed, tmp_path / "out")
    assert calls == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", ["../x", "../x.zst", "/etc/x.zst", "a/b.zst", ".hidden.zst", "..", "x"])
def test_unsafe_blob_names_refused(tmp_path, bad):
    src = save(tmp_path, 1, model())
    pack_checkpoint(src, tmp_path / "p")
    rewrite_pack(tmp_path / "p", lambda d: d["files"]["config.yaml"]["blob"].update(name=bad))
    with pytest.raises(CheckpointError, match="unsafe or duplicate blob name"):
        unpack_checkpoint(tmp_path / "p", tmp_path / "out")


def test_pack_json_must_agree_with_manifest(tmp_path):
    src = save(tmp_path, 1, model())
    pack_checkpoint(src, tmp_path / "p")

    def rename(d):
        d["files"]["../x"] = d["files"].pop("config.yaml")

    rewrite_pack(tmp_path / "p", rename)
    with pytest.raises(CheckpointError, match="files differ"):
        verify_packed(tmp_path / "p")


def test_extra_file_in_packed_dir_refused(tmp_path):
    src = save(tmp_path, 1, model())
    pack_checkpoint(src, tmp_path / "p")
    (tmp_path / "p" / "extra.zst").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="extra.zst: file not listed"):
        verify_packed(tmp_path / "p")


def plant_bomb(packed, name, expands_to, content_size=True):
    """Replace `name`'s blob by one zstd frame of `expands_to` zero bytes, PACK.json re-forged
    to match (sizes and hashes agree: only decompression can tell)."""
    bomb = zstandard.ZstdCompressor(write_content_size=content_size).compress(bytes(expands_to))
    (packed / f"{name}.zst").write_bytes(bomb)

    def edit(d):
        d["files"][name]["blob"].update(size=len(bomb), blake3=blake3.blake3(bomb).hexdigest())
        d["files"][name]["sections"][0]["frames"] = [len(bomb)]

    rewrite_pack(packed, edit)


@pytest.mark.parametrize("content_size", [True, False])
def test_frame_larger_than_declared_is_refused(tmp_path, content_size):
    """A decompression bomb: a frame that expands far past what PACK.json declares."""
    src = save(tmp_path, 1, {"ids": torch.zeros(2**17, dtype=torch.int64)})  # one 1 MiB plain section
    packed = tmp_path / "p"
    pack_checkpoint(src, packed)
    plant_bomb(packed, "model.safetensors", 256 * 2**20, content_size)
    # Hashes are consistent: only decompression catches it, bounded by the declared size.
    with pytest.raises(CheckpointError, match="model.safetensors.zst: .*(declares|frame)"):
        verify_packed(packed)
    with pytest.raises(CheckpointError, match="model.safetensors.zst: .*(declares|frame)"):
        unpack_checkpoint(packed, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_frame_sizes_are_bounded(tmp_path):
    """A frame may not be larger than zstd could ever make it: nothing is read unbounded."""
    src = save(tmp_path, 1, model())
    pack_checkpoint(src, tmp_path / "p")
    rewrite_pack(tmp_path / "p", lambda d: d["files"]["config.yaml"]["sections"][0].update(frames=[10**12]))
    with pytest.raises(CheckpointError, match="PACK.json: frame list .* 'config.yaml'"):
        verify_packed(tmp_path / "p")


def test_refuses_modified_source_and_existing_destination(tmp_path):
    src = save(tmp_path / "run", 1, model())
    (tmp_path / "p").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        pack_checkpoint(src, tmp_path / "p")
    data = bytearray((src / "model.safetensors").read_bytes())
    data[-1] ^= 0x80
    (src / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors: SHA-256 does not match manifest"):
        pack_checkpoint(src, tmp_path / "q")
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".tmp-*"))


def test_bf16_planes_beat_plain_zstd(tmp_path):
    weights = (torch.randn(1024, 1024) * 0.02).bfloat16()  # trained-ish: small normal values
    src = save(tmp_path, 1, {"w": weights})
    report = pack_checkpoint(src, tmp_path / "p")
    raw = (src / "model.safetensors").read_bytes()
    plain = len(zstandard.ZstdCompressor(level=3).compress(raw))
    packed = report.files["model.safetensors"].packed_bytes
    assert packed < 0.9 * plain, (packed, plain, len(raw))  # measured: 1.50x vs 1.28x


def forge_packed_file(packed, name, data):
    """Make the pack restore `data` as `name`, with PACK.json and MANIFEST.json re-forged to
    match: every hash agrees, only the format of the restored bytes can catch it."""
    blob = zstandard.ZstdCompressor().compress(data)
    (packed / f"{name}.zst").write_bytes(blob)
    manifest = json.loads((packed / MANIFEST).read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (packed / MANIFEST).write_text(json.dumps(manifest))

    def edit(d):
        d["manifest_sha256"] = hashlib.sha256((packed / MANIFEST).read_bytes()).hexdigest()
        d["files"][name].update(size=len(data), sha256=manifest["files"][name]["sha256"], sections=[
            {"length": len(data), "planes": 1, "frames": [len(blob)]}])
        d["files"][name]["blob"].update(size=len(blob), blake3=blake3.blake3(blob).hexdigest())

    rewrite_pack(packed, edit)


def test_pack_that_restores_a_pickle_as_weights_is_refused(tmp_path):
    import pickle

    src = save(tmp_path / "run", 1, model())
    packed = tmp_path / "p"
    pack_checkpoint(src, packed)
    forge_packed_file(packed, "model.safetensors", pickle.dumps({"w": list(range(100))}))
    with pytest.raises(CheckpointError, match="model.safetensors: header declares"):
        verify_packed(packed)
    with pytest.raises(CheckpointError, match="model.safetensors: header declares"):
        unpack_checkpoint(packed, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))


def test_ckpt_verify_refuses_a_bomb_for_a_small_file_in_one_line(tmp_path):
    """A 3 KB file whose blob decompresses to 64 MiB: refused as it expands."""
    from typer.testing import CliRunner

    from bastion.cli import app

    src = save_checkpoint(tmp_path / "run", 1, Checkpoint(model=model(), trainer_state={"note": "x" * 3000},
                                                          config_yaml="a: 1\n", tokenizer_json="{}"))
    assert 3000 < (src / "trainer_state.json").stat().st_size < 3100
    packed = tmp_path / "p"
    pack_checkpoint(src, packed)
    plant_bomb(packed, "trainer_state.json", 64 * 2**20, content_size=False)
    result = CliRunner().invoke(app, ["ckpt", "verify", str(packed)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "trainer_state.json.zst: corrupt zstd frame" in result.output


def bare_checkpoint(directory, tensors):
    """A checkpoint whose model.safetensors the safetensors library wrote: every tensor
    stored as given (as checkpoints saved before ties were stored once)."""
    make_private_dir(directory)
    data = safetensors.torch.save(tensors)
    write_bytes(directory / "model.safetensors", data)
    write_bytes(directory / MANIFEST, manifest_bytes(build_manifest({"model.safetensors": data})))
    return directory


def test_identical_tensors_are_stored_once(tmp_path):
    g = torch.Generator().manual_seed(0)
    emb = (torch.randn(300, 64, generator=g) * 0.02).bfloat16()
    ids = torch.randint(0, 2**40, (900,), generator=g)
    tensors = {"a.emb": emb, "b.mid": (torch.randn(300, 64, generator=g) * 0.02).bfloat16(), "c.out": emb.clone(),
               "d.ids": ids, "e.ids": ids.clone()}  # integer tensors too, far apart in the file
    src = bare_checkpoint(tmp_path / "src", tensors)
    report = pack_checkpoint(src, tmp_path / "p", chunk_bytes=SMALL_CHUNK, threads=2)
    sections = json.loads((tmp_path / "p" / PACK).read_text())["files"]["model.safetensors"]["sections"]
    same = {s["tensor"]: sections[s["same_as"]]["tensor"] for s in sections if "same_as" in s}
    assert same == {"c.out": "a.emb", "e.ids": "d.ids"}
    stored_once = pack_checkpoint(bare_checkpoint(tmp_path / "once", {k: tensors[k] for k in ("a.emb", "b.mid", "d.ids")}),
                                  tmp_path / "p-once", chunk_bytes=SMALL_CHUNK)
    assert report.files["model.safetensors"].packed_bytes < stored_once.files["model.safetensors"].packed_bytes + 512
    verify_packed(tmp_path / "p")
    assert contents(unpack_checkpoint(tmp_path / "p", tmp_path / "out", threads=2)) == contents(src)


def test_chunks_the_planes_cut_apart_are_compressed_whole(tmp_path):
    """A block repeated one byte further on: whole, zstd finds the repeat; split into planes,
    each copy lands in a different plane and looks random. The pack keeps the better one."""
    block = os.urandom(32768)
    data = torch.frombuffer(bytearray(block + block[1:] + b"\0"), dtype=torch.float32).clone()
    src = bare_checkpoint(tmp_path / "src", {"w": data})
    report = pack_checkpoint(src, tmp_path / "p")
    section = next(s for s in json.loads((tmp_path / "p" / PACK).read_text())["files"]["model.safetensors"]["sections"]
                   if s.get("tensor") == "w")
    assert section["raw_chunks"] == [0] and len(section["frames"]) == 1
    plain = len(zstandard.ZstdCompressor(level=3).compress((src / "model.safetensors").read_bytes()))
    assert report.files["model.safetensors"].packed_bytes <= plain * 1.01
    assert contents(unpack_checkpoint(tmp_path / "p", tmp_path / "out")) == contents(src)


def test_version_1_packs_still_unpack_and_cannot_use_version_2_sections(tmp_path, monkeypatch):
    src = save(tmp_path / "run", 1, {"w": torch.randn(64, 64) * 0.02, "h": torch.randn(64, 64).half()})
    with monkeypatch.context() as m:  # the version-1 writer: the same code without the sign rotation, SHA-256 blobs
        m.setattr(pack_mod, "FORMAT_VERSION", 1)
        pack_checkpoint(src, tmp_path / "p")
    index = json.loads((tmp_path / "p" / PACK).read_text())
    assert index["format_version"] == 1 and index["codec"]["float_transform"] == "byteplanes"
    assert set(index["files"]["model.safetensors"]["blob"]) == {"name", "size", "sha256"}
    assert contents(unpack_checkpoint(tmp_path / "p", tmp_path / "out")) == contents(src)
    emb = torch.randn(64, 64) * 0.02
    pack_checkpoint(bare_checkpoint(tmp_path / "dup", {"a": emb, "b": emb.clone()}), tmp_path / "p2")
    def as_version_1(d):
        d.update(format_version=1)
        d["codec"].update(float_transform="byteplanes")
        for meta in d["files"].values():  # version 1 hashed its blobs with SHA-256
            blob = meta["blob"]
            del blob["blake3"]
            blob["sha256"] = hashlib.sha256((tmp_path / "p2" / blob["name"]).read_bytes()).hexdigest()
    rewrite_pack(tmp_path / "p2", as_version_1)
    with pytest.raises(CheckpointError, match="same_as must name an earlier stored section"):
        verify_packed(tmp_path / "p2")


def test_version_2_packs_still_unpack(tmp_path, monkeypatch):
    """Format 2: the same transform as 3, blobs hashed with SHA-256 (and checked with it)."""
    src = save(tmp_path / "run", 1, {"w": torch.randn(64, 64) * 0.02, "h": torch.randn(64, 64).bfloat16()})
    with monkeypatch.context() as m:
        m.setattr(pack_mod, "FORMAT_VERSION", 2)
        pack_checkpoint(src, tmp_path / "p")
    index = json.loads((tmp_path / "p" / PACK).read_text())
    assert index["format_version"] == 2 and set(index["files"]["model.safetensors"]["blob"]) == {"name", "size", "sha256"}
    assert contents(unpack_checkpoint(tmp_path / "p", tmp_path / "out")) == contents(src)
    blob = tmp_path / "p" / "model.safetensors.zst"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.chmod(0o600)
    blob.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 hash does not match"):
        verify_packed(tmp_path / "p")


def test_a_blob_entry_names_the_hash_of_its_format(tmp_path):
    src = save(tmp_path / "run", 1, {"w": torch.randn(64, 64) * 0.02})
    pack_checkpoint(src, tmp_path / "p")
    blob = json.loads((tmp_path / "p" / PACK).read_text())["files"]["model.safetensors"]["blob"]
    assert set(blob) == {"name", "size", "blake3"}
    rewrite_pack(tmp_path / "p", lambda d: d["files"]["model.safetensors"]["blob"].update(sha256=blob["blake3"]))
    with pytest.raises(CheckpointError, match="malformed blob entry"):
        verify_packed(tmp_path / "p")


def _edit_same_as(value):
    def edit(d):
        sections = d["files"]["model.safetensors"]["sections"]
        section = next(s for s in sections if "same_as" in s)
        if value == "self":
            section["same_as"] = sections.index(section)
        elif value == "with frames":
            section["frames"] = [5]
        elif value == "chain":  # a later duplicate naming the earlier same_as section
            sections.append(dict(section, same_as=sections.index(section)))
        else:
            section["same_as"] = value
    return edit


@pytest.mark.parametrize("value", ["self", 99, -1, "with frames", "chain", 0, True])
def test_hostile_same_as_refused(tmp_path, value):
    emb = torch.randn(64, 64) * 0.02
    pack_checkpoint(bare_checkpoint(tmp_path / "dup", {"a": emb, "b": emb.clone()}), tmp_path / "p")
    rewrite_pack(tmp_path / "p", _edit_same_as(value))  # 0: the JSON header section, another length
    with pytest.raises(CheckpointError):
        verify_packed(tmp_path / "p")


@pytest.mark.parametrize("raw_chunks", [[1], [0, 0], "0", [-1], [True]])
def test_hostile_raw_chunks_refused(tmp_path, raw_chunks):
    src = save(tmp_path / "run", 1, {"w": torch.randn(64, 64) * 0.02})
    pack_checkpoint(src, tmp_path / "p")
    rewrite_pack(tmp_path / "p", lambda d: next(s for s in d["files"]["model.safetensors"]["sections"]
                                                if s.get("tensor") == "w").update(raw_chunks=raw_chunks))
    with pytest.raises(CheckpointError, match="frame list"):
        verify_packed(tmp_path / "p")


def test_the_c_loop_and_numpy_write_the_same_pack(tmp_path, monkeypatch):
    """The byte-plane transform has two implementations (bastion/checkpoint/planes.py): a
    package built without a C compiler must write and read exactly the same packs."""
    from bastion.checkpoint import planes

    gen = torch.Generator().manual_seed(3)
    tensors = {"bf16": (torch.randn(300_000, generator=gen) * 0.02).bfloat16(),
               "fp16": (torch.randn(70_001, generator=gen)).half(),
               "fp32": torch.randn(90_000, generator=gen) * 0.02,
               "fp64": torch.randn(20_000, generator=gen, dtype=torch.float64)}
    src = save(tmp_path / "run", 1, tensors)
    pack_checkpoint(src, tmp_path / "native", chunk_bytes=256 * 1024)
    monkeypatch.setattr(planes, "_planes", None)
    pack_checkpoint(src, tmp_path / "numpy", chunk_bytes=256 * 1024)
    assert contents(tmp_path / "native") == contents(tmp_path / "numpy")
    assert contents(unpack_checkpoint(tmp_path / "native", tmp_path / "out")) == contents(src)


def test_planes_that_do_not_shrink_are_stored_and_the_exponents_are_coded(tmp_path):
    """bf16 weights: the low byte (7 mantissa bits and the sign) is noise, stored raw at
    zstd's fastest level; the exponent byte is entropy-coded (~3x on N(0, 0.02))."""
    gen = torch.Generator().manual_seed(4)
    n = 2**20  # one chunk: 2 MiB, planes of 1 MiB
    src = bare_checkpoint(tmp_path / "src", {"w": (torch.randn(n, generator=gen) * 0.02).bfloat16()})
    pack_checkpoint(src, tmp_path / "p", chunk_bytes=4 * 2**20)
    section = next(s for s in json.loads((tmp_path / "p" / PACK).read_text())["files"]["model.safetensors"]["sections"]
                   if s.get("tensor") == "w")
    low, exponent = section["frames"]
    assert n <= low <= n * 1.001  # stored: raw blocks, a few header bytes
    assert exponent < n / 2.8
    assert contents(unpack_checkpoint(tmp_path / "p", tmp_path / "out")) == contents(src)
