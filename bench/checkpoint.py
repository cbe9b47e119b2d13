"""Checkpoints: save/load cost of Bastion's verified format, and lossless compression.

Trains a real small model first (the `small` preset on Python standard-library source, with
the real `bastion.train.train()` loop) so the weights and AdamW state are realistic, stopping
one step short and resuming so the last two checkpoints are consecutive steps. Then, on that
model, in one process, repetitions interleaved and medians reported:

1. save + load: `save_checkpoint`/`load_checkpoint` (fsync, SHA-256 manifest, verification)
   vs `torch.save`/`torch.load(weights_only=True)` vs `safetensors.torch.save_file`/`load_file`,
   and the cost of hashing the file alone. Ratios are against plain safetensors.
2. compression: `pack_checkpoint`/`unpack_checkpoint` vs plain zstd (same level, same
   threads, file to file with fsync, as `zstd -T<n>` would) and ZipNN (PyPI `zipnn`, same
   threads; `pip install zipnn`, a bench-only dependency) on the same files, in one run: the
   fp32 weights, the same weights cast to bf16 (saved now: the tie stored once), the bf16
   weights with the tie stored twice (as older saves and other tools write them), the demo's
   model (`mini`, as initialised) in bf16 with the tie stored twice, and the newer checkpoint
   (model + optimizer) plain and as a delta against the one before it. Wall MB/s and MB per
   CPU-second (the process's CPU time, every thread: what a shared machine's load does not
   inflate). Also: which bits one AdamW step actually flips.
3. save memory: the peak memory a save adds on top of the state it writes (model + AdamW),
   `save_checkpoint` (streams tensor by tensor) vs serializing each file to bytes first (as
   it did before) vs `safetensors.torch.save_file`, each in its own process.

4. load verification (`--load-verify`, alone, no training: random weights of the `small`
   and `base` presets with AdamW-shaped optimizer state): what verifying the whole manifest
   on every load costs. `load_checkpoint(load_optimizer=False)` and `load_for_inference`
   (what `bastion generate` does) of a checkpoint with its optimizer state, which they hash
   without reading it, vs the same checkpoint without that file; and the hash alone.

    python bench/checkpoint.py                  # ~3-4 minutes on a 2-core CPU
    python bench/checkpoint.py --json out.json
    python bench/checkpoint.py --compression-only --preset mini --vocab-size 4096 --steps 40 --reps 3 --threads 2
                                                # the demo's model: section 2 only (pip install zipnn)
    python bench/checkpoint.py --load-verify    # ~5 minutes
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import shutil
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
import zstandard

from bastion.checkpoint import (
    Checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from bastion.checkpoint import planes as byteplanes
from bastion.checkpoint.formats import check_file
from bastion.checkpoint.manifest import MANIFEST, build_manifest, manifest_bytes
from bastion.checkpoint.pack import pack_checkpoint, unpack_checkpoint
from bastion.config import build_config, to_yaml
from bastion.data import prepare_dataset
from bastion.safeio import sha256_file
from bastion.train import train
from bastion.train.schedule import lr_at


def prepare(workdir: Path, vocab_size: int) -> Path:
    """The dataset bench/train_throughput.py uses: standard-library source, BPE tokenizer.
    The sources are copied into `workdir` first, so they sit inside data.allowed_roots."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for package in ("email", "http", "json", "asyncio", "logging"):
        shutil.copytree(stdlib / package, workdir / "src" / package, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = build_config({"data": {
        "sources": [str(workdir / "src" / p / "*.py") for p in ("email", "http", "json", "asyncio", "logging")],
        "text_suffixes": [".py"], "output_dir": str(workdir / "data"), "val_fraction": 0.0,
        "allowed_roots": [str(workdir)], "tokenizer": {"vocab_size": vocab_size},
    }})
    prepare_dataset(cfg.data)
    return workdir / "data"


def train_model(args, data_dir: Path, out_dir: Path) -> tuple[Path, Path, float]:
    """Train `args.steps` steps of a schedule twice that long (so the last step is mid-decay,
    not at the tail's tiny learning rate); return the checkpoints of steps N-1 and N and the
    learning rate of the step between them."""
    cfg = build_config({
        "model": {"preset": args.preset, "max_seq_len": args.seq_len},
        "train": {"data_dir": str(data_dir), "out_dir": str(out_dir), "seq_len": args.seq_len,
                  "batch_size": args.batch_size, "max_steps": 2 * args.steps, "lr": 1e-3, "warmup_steps": 10,
                  "eval_every": 10**8, "log_every": 10, "dtype": "float32", "device": "cpu", "seed": 0},
        "checkpoint": {"every_steps": 10**8, "keep_last": 2, "save_optimizer": True},
    }, source="bench config")
    train(cfg, quiet=True, should_stop=lambda step: step >= args.steps - 1)  # checkpoint at N-1, stop
    train(cfg, quiet=True, resume=True, should_stop=lambda step: step >= args.steps)  # one more, checkpoint at N
    older, newer = list_checkpoints(out_dir / "checkpoints")[-2:]
    tc = cfg.train
    lr = lr_at(args.steps - 1, lr=tc.lr, warmup_steps=tc.warmup_steps, total_steps=tc.max_steps, min_lr_ratio=tc.min_lr_ratio)
    return older, newer, lr


def unique_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop tied aliases (plain safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, t in tensors.items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[name] = t.contiguous()
    return out


def fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fresh(path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


def bench_save_load(weights: dict[str, torch.Tensor], work: Path, reps: int) -> dict:
    ours_root, pt, st = work / "ours", work / "model.pt", work / "model.safetensors"
    ckpt = Checkpoint(model=weights, trainer_state={}, config_yaml="", tokenizer_json="{}")
    methods = {  # name: (save or None, load)
        "bastion save_checkpoint/load_checkpoint": (
            lambda: save_checkpoint(fresh(ours_root), 1, ckpt), lambda: load_checkpoint(ours_root)),
        "torch.save/torch.load(weights_only)": (
            lambda: torch.save(weights, fresh(pt)), lambda: torch.load(pt, weights_only=True)),  # security-reviewed: the baseline, on a file this script just wrote
        "safetensors save_file/load_file": (
            lambda: safetensors.torch.save_file(weights, fresh(st)), lambda: safetensors.torch.load_file(st)),
        # What durability alone costs: the same write, then fsync (our save fsyncs every file).
        "safetensors save_file + fsync": (lambda: (safetensors.torch.save_file(weights, fresh(st)), fsync(st)), None),
        # load_file maps the file and reads pages on first touch; this one reads every byte.
        "safetensors load_file(backend='pread')": (None, lambda: safetensors.torch.load_file(st, backend="pread")),
    }
    times = {name: {"save": [], "load": []} for name in methods}
    hashing = []
    for _ in range(reps):
        for name, (save, load) in methods.items():
            if save is not None:
                times[name]["save"].append(timed(save))
            if load is not None:
                times[name]["load"].append(timed(load))
        hashing.append(timed(lambda: sha256_file(st)))
    base = {op: statistics.median(times["safetensors save_file/load_file"][op]) for op in ("save", "load")}
    rows = {name: {op: statistics.median(v[op]) if v[op] else None for op in ("save", "load")} for name, v in times.items()}
    for row in rows.values():
        row["save_vs_safetensors"] = row["save"] / base["save"] if row["save"] else None
        row["load_vs_safetensors"] = row["load"] / base["load"] if row["load"] else None
    return {"bytes": st.stat().st_size, "methods": rows, "sha256_seconds": statistics.median(hashing)}


def save_memory_job(kind: str, ckpt_dir: Path, out: Path) -> None:
    """(In a subprocess.) Load a checkpoint's model + AdamW tensors, save them, print the
    save's peak memory above what the loaded tensors already held, and its time."""
    from memstat import reset_peak, status_bytes

    ckpt = load_checkpoint(ckpt_dir)
    reset_peak()  # loading's own peak must not count
    before = status_bytes("VmRSS")
    start = time.perf_counter()
    if kind == "bastion":
        save_checkpoint(out, 1, ckpt)
    elif kind == "in-memory":  # serialize every file to bytes first (save_checkpoint before 2026-11-29)
        out.mkdir()
        files = {"model.safetensors": safetensors.torch.save(unique_tensors(ckpt.model)),
                 "optimizer.safetensors": safetensors.torch.save(ckpt.optimizer)}
        for name, data in files.items():
            (out / name).write_bytes(data)
    else:  # the library's own file writer, the same two tensor files, no hashing
        out.mkdir()
        safetensors.torch.save_file(unique_tensors(ckpt.model), out / "model.safetensors")
        safetensors.torch.save_file(ckpt.optimizer, out / "optimizer.safetensors")
    seconds = time.perf_counter() - start
    peak = status_bytes("VmHWM") - before
    print(json.dumps({"peak_bytes": max(peak, 0), "seconds": seconds}))


def bench_save_memory(ckpt_dir: Path, work: Path, reps: int) -> dict:
    """Peak memory of a save on top of the state itself: our streaming writer vs in-memory
    serialization vs safetensors.torch.save_file, each in its own process (glibc told to
    return large blocks at once, so RSS follows the buffers), alternating."""
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    runs: dict[str, list[dict]] = {"bastion": [], "in-memory": [], "safetensors": []}
    state = sum((ckpt_dir / f).stat().st_size for f in ("model.safetensors", "optimizer.safetensors"))
    for _ in range(reps):
        for kind in runs:
            out = fresh(work / f"mem-{kind}")
            proc = subprocess.run([sys.executable, __file__, "--save-memory-job", kind, str(ckpt_dir), str(out)],
                                  capture_output=True, text=True, env=env, timeout=600, check=True)
            runs[kind].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            fresh(out)
    return {"state_bytes": state, **{kind: {"peak_bytes": statistics.median(r["peak_bytes"] for r in rows),
                                            "seconds": statistics.median(r["seconds"] for r in rows)}
                                     for kind, rows in runs.items()}}


def zstd_files(src: Path, dst: Path, level: int, threads: int, decompress: bool = False) -> None:
    """Plain zstd, file to file, streaming, fsynced: what `zstd -T<threads> -<level>` does."""
    codec = zstandard.ZstdDecompressor() if decompress else zstandard.ZstdCompressor(level=level, threads=threads)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        codec.copy_stream(fin, fout)
        fout.flush()
        os.fsync(fout.fileno())


def zipnn_files(src: Path, dst: Path, dtype: str, threads: int, decompress: bool = False) -> None:
    """ZipNN (PyPI `zipnn`), file to file with fsync as zstd_files does: the whole file in
    memory, its float dtype given (the library's default is bf16). ZipNN reorders the bytes
    of its input in place, so it gets its own copy of them."""
    import zipnn

    codec = zipnn.ZipNN(input_format="byte", bytearray_dtype=dtype, threads=threads)
    with open(src, "rb") as fin:
        data = bytearray(os.fstat(fin.fileno()).st_size)
        fin.readinto(data)
    out = codec.decompress(data) if decompress else codec.compress(data)
    with open(dst, "wb") as fout:
        fout.write(out)
        fout.flush()
        os.fsync(fout.fileno())


def zipnn_dtype(path: Path) -> str:
    """The float dtype holding most of a safetensors file's bytes, as ZipNN names it."""
    from bastion.checkpoint.safetensors_check import parse_header

    header, _ = parse_header(path.read_bytes()[: 8 + int.from_bytes(path.read_bytes()[:8], "little")], path,
                             size=path.stat().st_size)
    weight: dict[str, int] = {}
    for info in header.values():
        weight[info["dtype"]] = weight.get(info["dtype"], 0) + info["data_offsets"][1] - info["data_offsets"][0]
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(max(weight, key=weight.get), "bfloat16")


def cpu_timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process: every thread, the codecs' own too)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_pack(src: Path, work: Path, args, base: Path | None = None, files: tuple[str, ...] = ("model.safetensors",)) -> dict:
    """Ours (whole checkpoint, optionally as a delta) vs plain zstd and ZipNN of `files`,
    interleaved, same threads. Each codec's restored bytes are checked against the source."""
    packed, restored, zdir, ndir = work / "packed", work / "restored", work / "zstd", work / "zipnn"
    times: dict[str, dict[str, list]] = {c: {k: [] for k in ("pack", "pack_cpu", "unpack")} for c in ("ours", "zstd", "zipnn")}
    dtypes = {f: zipnn_dtype(src / f) for f in files}
    report = None

    def record(codec: str, kind: str, fn) -> None:
        wall, cpu = cpu_timed(fn)
        times[codec][kind].append(wall)
        if kind == "pack":
            times[codec]["pack_cpu"].append(cpu)

    for _ in range(args.reps):
        fresh(packed), fresh(restored), fresh(zdir).mkdir(parents=True), fresh(ndir).mkdir()
        holder = {}
        record("ours", "pack", lambda: holder.update(r=pack_checkpoint(src, packed, base=base, level=args.level,
                                                                      threads=args.threads)))
        report = holder["r"]
        record("ours", "unpack", lambda: unpack_checkpoint(packed, restored, base=base, threads=args.threads))
        record("zstd", "pack", lambda: [zstd_files(src / f, zdir / f"{f}.zst", args.level, args.threads) for f in files])
        record("zstd", "unpack", lambda: [zstd_files(zdir / f"{f}.zst", zdir / f, 0, 0, decompress=True) for f in files])
        record("zipnn", "pack", lambda: [zipnn_files(src / f, ndir / f"{f}.znn", dtypes[f], args.threads) for f in files])
        record("zipnn", "unpack", lambda: [zipnn_files(ndir / f"{f}.znn", ndir / f, dtypes[f], args.threads, decompress=True)
                                           for f in files])
    for f in files:
        assert (restored / f).read_bytes() == (src / f).read_bytes() == (zdir / f).read_bytes() == (ndir / f).read_bytes()
    sizes = {f: (src / f).stat().st_size for f in files}
    original, ours_total = sum(sizes.values()), report.original_bytes
    packed_sizes = {"ours": {f: report.files[f].packed_bytes for f in files},
                    "zstd": {f: (zdir / f"{f}.zst").stat().st_size for f in files},
                    "zipnn": {f: (ndir / f"{f}.znn").stat().st_size for f in files}}
    out: dict = {"files": list(files), "original_bytes": original, "file_bytes": sizes}
    for codec, per_file in packed_sizes.items():
        moved = ours_total if codec == "ours" else original  # ours packs the whole checkpoint
        t = times[codec]
        out[codec] = {"packed_bytes": sum(per_file.values()), "ratio": original / sum(per_file.values()),
                      "pack_mb_s": moved / 1e6 / statistics.median(t["pack"]),
                      "pack_mb_per_cpu_s": moved / 1e6 / statistics.median(t["pack_cpu"]),
                      "unpack_mb_s": moved / 1e6 / statistics.median(t["unpack"]),
                      "per_file_ratio": {f: sizes[f] / per_file[f] for f in files}}
    out["ours"].update(whole_checkpoint_ratio=report.ratio, delta_tensors=sum(r.delta_tensors for r in report.files.values()))
    return out


def bare_checkpoint(tensors: dict[str, torch.Tensor], dst: Path) -> Path:
    """A checkpoint folder whose model.safetensors the safetensors library wrote, every
    tensor stored as given (a tied model cast tensor by tensor holds the tie twice, as
    checkpoints saved before 2026-12-03 and files from other tools do)."""
    dst.mkdir(parents=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, dst / "model.safetensors")
    (dst / MANIFEST).write_bytes(manifest_bytes(build_manifest({"model.safetensors": dst / "model.safetensors"})))
    return dst


def init_like(mb: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`mb` MB of weights as a model is initialised (normal, std 0.02), in eight tensors, seeded."""
    generator = torch.Generator().manual_seed(0)
    per_tensor = mb * 2**20 // (torch.finfo(dtype).bits // 8) // 8
    return {f"layers.{i}.weight": (torch.randn(per_tensor, generator=generator) * 0.02).to(dtype) for i in range(8)}


def sha256_speed(path: Path) -> float:
    """MB of `path` hashed per CPU-second (one thread): the part of the pack no codec can skip,
    since every source byte is checked against the manifest's SHA-256 as it is packed."""
    data = path.read_bytes()
    cpu = time.process_time()
    hashlib.sha256(data).digest()
    return len(data) / 1e6 / max(time.process_time() - cpu, 1e-9)


def demo_sized_bf16(vocab_size: int) -> dict[str, torch.Tensor]:
    """The demo's model (`mini` preset, its 4k vocabulary) as initialised, cast to bf16
    tensor by tensor, so the tied embedding is held twice."""
    from bastion.demo import demo_config
    from bastion.model import Transformer

    cfg = demo_config(Path(tempfile.gettempdir()) / "unused", steps=1).model.model_copy(update={"vocab_size": vocab_size})
    torch.manual_seed(0)
    return {k: v.bfloat16() for k, v in Transformer(cfg).state_dict().items()}


def bit_flips(older: Path, newer: Path, name: str) -> dict:
    """For the fp32 tensors of `name`: how one optimizer step changes their bits."""
    a, b = safetensors.torch.load_file(older / name), safetensors.torch.load_file(newer / name)
    changed = total = 0
    plane_nonzero = np.zeros(4)
    bits = np.zeros(32)
    for key, t in b.items():
        if t.dtype != torch.float32 or key not in a or a[key].shape != t.shape or t.numel() < 2:
            continue
        x = (a[key].view(torch.int32).numpy() ^ t.view(torch.int32).numpy()).view(np.uint32).ravel()
        total += x.size
        changed += int(np.count_nonzero(x))
        plane_nonzero += [np.count_nonzero((x >> (8 * k)) & 0xFF) for k in range(4)]
        bits += [np.count_nonzero((x >> k) & 1) for k in range(32)]
    return {
        "elements": total, "changed_fraction": changed / total,
        "byte_plane_changed_fraction": {f"byte{k}": plane_nonzero[k] / total for k in range(4)},  # byte3 = sign+exponent
        "mean_bits_flipped": float(bits.sum() / total),
        "flips_in_low_16_bits": float(bits[:16].sum() / max(bits.sum(), 1)),
    }


def random_checkpoint(preset: str, root: Path, vocab_size: int) -> Path:
    """A `preset` model of random weights, AdamW-shaped optimizer state (two moments per
    weight: hashing cost does not depend on the values) and a real tokenizer (trained on
    standard-library source) whose vocabulary the model's embedding matches."""
    from bastion.model import Transformer
    from bastion.tokenizer import BastionTokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = (p.read_text(encoding="utf-8") for package in ("email", "json", "http") for p in (stdlib / package).glob("*.py"))
    tokenizer = BastionTokenizer.train(texts, vocab_size=vocab_size)
    cfg = build_config({"model": {"preset": preset, "vocab_size": tokenizer.vocab_size}}, source="bench config")
    torch.manual_seed(0)
    weights = Transformer(cfg.model).state_dict()
    optimizer = {f"state.{i}.{moment}": torch.randn_like(t) for i, t in enumerate(unique_tensors(weights).values())
                 for moment in ("exp_avg", "exp_avg_sq")}
    return save_checkpoint(root, 1, Checkpoint(model=weights, trainer_state={"step": 1}, config_yaml=to_yaml(cfg),
                                               tokenizer_json=tokenizer.to_json_str(), optimizer=optimizer))


def without(ckpt_dir: Path, name: str, dst: Path) -> Path:
    """A copy of a checkpoint without one file (its manifest rewritten to match)."""
    shutil.copytree(ckpt_dir, dst)
    os.chmod(dst / name, 0o600)
    (dst / name).unlink()
    files = {p.name: p for p in dst.iterdir() if p.name != MANIFEST}
    os.chmod(dst / MANIFEST, 0o600)
    (dst / MANIFEST).write_bytes(manifest_bytes(build_manifest(files)))
    return dst


def generate_process(ckpt_dir: Path) -> None:
    """`bastion generate` of one token in a fresh process: what a user waits for."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "bastion.cli", "generate", "--checkpoint", str(ckpt_dir), "-p", "hi",
                    "--max-new-tokens", "1"], check=True, capture_output=True, timeout=600)


def bench_load_verify(preset: str, work: Path, reps: int, vocab_size: int) -> dict:
    """Load time with and without the optimizer state hashed (interleaved, medians)."""
    from bastion.infer.loading import load_for_inference

    full = random_checkpoint(preset, work / preset, vocab_size)
    bare = without(full, "optimizer.safetensors", work / f"{preset}-no-optimizer" / full.name)
    entry = json.loads((full / MANIFEST).read_text())["files"]["optimizer.safetensors"]
    loads = {"load_checkpoint": lambda p: load_checkpoint(p, load_optimizer=False), "load_for_inference": load_for_inference,
             "generate process": generate_process}
    times: dict[str, list[float]] = {f"{kind} {which}": [] for kind in loads for which in ("hashing", "without")}
    times["optimizer hash alone"] = []
    for _ in range(reps):
        for kind, load in loads.items():
            times[f"{kind} hashing"].append(timed(lambda: load(full)))
            times[f"{kind} without"].append(timed(lambda: load(bare)))
        times["optimizer hash alone"].append(timed(lambda: check_file(full / "optimizer.safetensors", entry)))
    params = sum(t.numel() for t in unique_tensors(load_checkpoint(bare).model).values())
    return {"params": params, "model_bytes": (full / "model.safetensors").stat().st_size,
            "optimizer_bytes": entry["size"], **{k: statistics.median(v) for k, v in times.items()}}


def print_load_verify(r: dict) -> None:
    print(f"\n{'load (median of ' + str(r['reps']) + ')':16} {'params':>12} {'model MB':>9} {'optim MB':>9} "
          f"{'load_checkpoint':>24} {'load_for_inference':>24} {'generate process':>24} {'hash alone':>10}")
    for preset, row in r["presets"].items():
        cells = [f"{row[k + ' without']:.3f} -> {row[k + ' hashing']:.3f} s"
                 for k in ("load_checkpoint", "load_for_inference", "generate process")]
        print(f"{preset:16} {row['params']:12,} {row['model_bytes'] / 1e6:9.1f} {row['optimizer_bytes'] / 1e6:9.1f} "
              f"{cells[0]:>24} {cells[1]:>24} {cells[2]:>24} {row['optimizer hash alone']:9.3f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=80, help="training steps before measuring")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=5, help="repetitions of every measurement")
    parser.add_argument("--level", type=int, default=3, help="zstd level, both codecs")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="compression threads, both codecs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--large-mb", type=int, default=0,
                        help="also pack two synthetic files of this many MB (init-like weights, N(0, 0.02) in bf16 "
                             "and fp32): the pack's speed where per-file costs do not dominate; 0: skip")
    parser.add_argument("--compression-only", action="store_true",
                        help="train, then only section 2 (compression) and the bit flips: no save/load or save-memory runs")
    parser.add_argument("--load-verify", action="store_true", help="only section 4: the cost of verifying every file on load")
    parser.add_argument("--save-memory-job", nargs=3, metavar=("KIND", "CKPT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save_memory_job:
        kind, ckpt_dir, out = args.save_memory_job
        return save_memory_job(kind, Path(ckpt_dir), Path(out))
    if args.load_verify:
        with tempfile.TemporaryDirectory() as tmp:
            presets = {p: bench_load_verify(p, Path(tmp), args.reps, args.vocab_size) for p in ("small", "base")}
        result = {"device": f"CPU ({os.cpu_count()} cores), torch {torch.__version__}", "reps": args.reps,
                  "vocab_size": args.vocab_size, "presets": presets}
        print_load_verify(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return None

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = prepare(work, args.vocab_size)
        older, newer, step_lr = train_model(args, data_dir, work / "run")
        print(f"trained {args.preset} for {args.steps} steps in {time.perf_counter() - started:.0f} s "
              f"(checkpoints {older.name}, {newer.name}; lr of the last step {step_lr:.2e})", flush=True)
        weights = unique_tensors(load_checkpoint(newer).model)
        params = sum(t.numel() for t in weights.values())

        save_load = None if args.compression_only else bench_save_load(weights, work / "sl", args.reps)
        fresh(work / "sl")
        fp32 = save_checkpoint(work / "fp32", 1, Checkpoint(model=weights, trainer_state={}, config_yaml="", tokenizer_json="{}"))
        bf16 = save_checkpoint(work / "bf16", 1, Checkpoint(model={k: v.bfloat16() for k, v in weights.items()},
                                                            trainer_state={}, config_yaml="", tokenizer_json="{}"))
        both = ("model.safetensors", "optimizer.safetensors")
        tied = load_checkpoint(newer).model  # output.weight restored as the tie it is
        bf16_twice = bare_checkpoint({k: v.bfloat16() for k, v in tied.items()}, work / "bf16-twice")
        demo_twice = bare_checkpoint(demo_sized_bf16(4096), work / "demo-bf16-twice")
        compression = {
            "fp32 weights": bench_pack(fp32, work / "c", args),
            "bf16 weights": bench_pack(bf16, work / "c", args),
            "bf16 weights, tie stored twice": bench_pack(bf16_twice, work / "c", args),
            "demo-sized (mini, init) bf16, tie stored twice": bench_pack(demo_twice, work / "c", args),
            "newer checkpoint, no delta": bench_pack(newer, work / "c", args, files=both),
            "newer checkpoint, delta vs previous step": bench_pack(newer, work / "c", args, base=older, files=both),
        }
        if args.large_mb:
            for dtype in (torch.bfloat16, torch.float32):
                large = bare_checkpoint(init_like(args.large_mb, dtype), work / f"large-{dtype}")
                name = f"synthetic N(0, 0.02) {str(dtype).removeprefix('torch.')}, {args.large_mb} MB"
                compression[name] = bench_pack(large, work / "c", args)
                compression[name]["sha256_mb_per_cpu_s"] = sha256_speed(large / "model.safetensors")
                fresh(large)
        flips = {name: bit_flips(older, newer, name) for name in both}
        save_memory = None if args.compression_only else bench_save_memory(newer, work, args.reps)

    result = {
        "device": f"CPU ({os.cpu_count()} cores), torch {torch.__version__}, zstandard {zstandard.__version__}, "
                  f"zipnn {importlib.metadata.version('zipnn')}, native byte planes {byteplanes.NATIVE}",
        "load_average": os.getloadavg(),
        "preset": args.preset, "params": params, "train_steps": args.steps, "last_step_lr": step_lr, "level": args.level, "threads": args.threads,
        "save_load": save_load, "compression": compression, "adamw_step_bit_flips": flips, "save_memory": save_memory,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print_tables(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


def print_tables(r: dict) -> None:
    print(f"\n{r['preset']}: {r['params']:,} parameters; {r['device']}; load average {r['load_average']}")
    if r["save_load"]:
        print_save_load(r["save_load"])
    print_compression(r)
    if r["save_memory"]:
        print_save_memory(r["save_memory"])
    print(f"\ntotal {r['seconds']} s")


def print_save_load(sl: dict) -> None:
    print(f"\nmodel.safetensors {sl['bytes'] / 1e6:.1f} MB (fp32)")
    print(f"\n{'save / load (median)':44} {'save s':>8} {'load s':>8} {'save x':>7} {'load x':>7}")
    for name, row in sl["methods"].items():
        save, save_x, load, load_x = (f"{row[k]:{w}.{d}f}" if row[k] else f"{'-':>{w}}" for k, w, d in (
            ("save", 8, 3), ("save_vs_safetensors", 7, 2), ("load", 8, 3), ("load_vs_safetensors", 7, 2)))
        print(f"{name:44} {save} {load} {save_x} {load_x}")
    print(f"{'  of which SHA-256 of the file':44} {sl['sha256_seconds']:8.3f}")


def print_compression(r: dict) -> None:
    print(f"\n{'compression (level ' + str(r['level']) + ', ' + str(r['threads']) + ' threads)':46} {'MB':>6} "
          f"{'ours':>7} {'zstd':>7} {'zipnn':>7} | pack MB/s: {'ours':>5} {'zstd':>5} {'zipnn':>5} "
          f"| per CPU-s: {'ours':>5} {'zstd':>5} {'zipnn':>5} | unpack: {'ours':>5} {'zstd':>5} {'zipnn':>5}")
    codecs = ("ours", "zstd", "zipnn")
    for name, c in r["compression"].items():
        cells = [" ".join(f"{c[k][m]:5.0f}" for k in codecs) for m in ("pack_mb_s", "pack_mb_per_cpu_s", "unpack_mb_s")]
        print(f"{name:46} {c['original_bytes'] / 1e6:6.1f} " + " ".join(f"{c[k]['ratio']:6.3f}x" for k in codecs)
              + f" |            {cells[0]} |            {cells[1]} |         {cells[2]}")
        if "sha256_mb_per_cpu_s" in c:
            print(f"  {'of which SHA-256 of the source alone, MB per CPU-s':44} {c['sha256_mb_per_cpu_s']:6.0f}")
        if len(c["files"]) > 1:
            for f in c["files"]:
                print(f"  {f:44} {c['file_bytes'][f] / 1e6:6.1f} " + " ".join(f"{c[k]['per_file_ratio'][f]:6.3f}x" for k in codecs))
    print(f"\none AdamW step (lr {r['last_step_lr']:.2e}), fp32 bits (byte3 = sign + 7 exponent bits ... byte0 = low mantissa)")
    for name, f in r["adamw_step_bit_flips"].items():
        planes = " ".join(f"{k} {v:.1%}" for k, v in reversed(f["byte_plane_changed_fraction"].items()))
        print(f"  {name:24} changed {f['changed_fraction']:.1%}; bytes changed: {planes}; "
              f"{f['mean_bits_flipped']:.1f} bits/element, {f['flips_in_low_16_bits']:.0%} of flips in the low 16 bits")


def print_save_memory(m: dict) -> None:
    print(f"\nsave of model + AdamW state ({m['state_bytes'] / 1e6:.1f} MB): peak memory above the state, time")
    for kind in ("bastion", "in-memory", "safetensors"):
        print(f"  {kind:12} {m[kind]['peak_bytes'] / 1e6:8.1f} MB  {m[kind]['seconds']:6.3f} s")


if __name__ == "__main__":
    main()
