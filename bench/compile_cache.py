"""train.compile_cache: a cold torch.compile vs a warm one that loads the sealed cache.

Each run is `bastion.train.train()` with `train.compile: true` and `train.compile_cache`
pointing at one folder, in its own fresh Python process (nothing in memory carries over; the
cache folder and the HMAC key are the only things shared). Runs alternate cold (cache folder
emptied first) and warm (the entry the cold run before it sealed), `--rounds` times each.
Reported per run: seconds from calling train() to the end of the first optimizer step (which
is where the forward and backward graphs compile), the whole run's wall time, and the CPU
seconds of the process and every compiler process it started (gcc on CPU) - the number that
holds still when the machine is shared. Ratios are warm / cold, medians.

    OMP_NUM_THREADS=1 python bench/compile_cache.py            # ~6-15 minutes on a 2-core CPU
    python bench/compile_cache.py --preset mini --rounds 2 --json out.json

`--serve`: serve.compile and serve.compile_cache instead. A random checkpoint (d 256 x 4 layers
by default, bench/serve.py's shape) is served by real `bastion serve` processes: seconds from
starting the process to /ready answering 200, eager (no compile) vs compiled cold (cache folder
emptied) vs compiled warm (the entry the cold start sealed), each followed by one completion
(checked equal between cold and warm) and a SIGTERM; CPU seconds of the process and its
compilers. Then, in one child process, decode tokens/s of the engine eager vs compiled side by
side (1 stream and --streams at once, greedy, every request to its budget, medians of --rounds).

    OMP_NUM_THREADS=1 python bench/compile_cache.py --serve   # ~5-10 minutes on a 2-core CPU
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]


def child(args: argparse.Namespace) -> None:
    """One training run; prints a JSON line with its timings and the cache's events."""
    from bastion.config import build_config
    from bastion.train import train

    cfg = build_config({"model": {"preset": args.preset, "dropout": 0.0},
                        "train": {"data_dir": args.data, "out_dir": args.out, "seq_len": 64, "batch_size": 8,
                                  "max_steps": args.steps, "eval_every": args.steps, "eval_batches": 1,
                                  "log_every": args.steps, "threads": 1, "device": "cpu", "compile": True,
                                  "compile_cache": args.cache},
                        "checkpoint": {"every_steps": args.steps, "keep_last": 1}})
    start, first_step = time.perf_counter(), []

    def note_first_step(step: int) -> bool:
        if not first_step:
            first_step.append(time.perf_counter() - start)
        return False

    result = train(cfg, quiet=True, should_stop=note_first_step)
    total = time.perf_counter() - start
    print(json.dumps({"first_step_s": first_step[0], "run_s": total, "events": result.compile_cache,
                      "losses": result.losses}))


def run_once(args: argparse.Namespace, work: Path, data: Path, cache: Path, name: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    cmd = [sys.executable, __file__, "--child", "--preset", args.preset, "--steps", str(args.steps),
           "--data", str(data), "--out", str(work / name), "--cache", str(cache)]
    env = {**os.environ, "XDG_CONFIG_HOME": str(work / "config"), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child and the compilers it waited for
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return record


def prepare(work: Path) -> Path:
    from bastion.config import build_config
    from bastion.data import prepare_dataset
    from synthetic.corpus import arithmetic_documents, write_corpus

    write_corpus(work / "src", arithmetic_documents(1500, seed=0, max_operand=20), name="arith")
    cfg = build_config({"data": {"sources": [str(work / "src")], "output_dir": str(work / "data"),
                                 "allowed_roots": [str(work)], "val_fraction": 0.1, "tokenizer": {"vocab_size": 300}}})
    prepare_dataset(cfg.data)
    return work / "data"


# ---------------------------------------------------------------- serve.compile / serve.compile_cache
def serve_checkpoint(work: Path, args: argparse.Namespace) -> Path:
    from helpers import make_base_checkpoint
    from synthetic.chat import reverse_chat_records

    texts = [str(r) for r in reverse_chat_records(500, seed=1)]
    return make_base_checkpoint(work / "ckpt", texts=texts, vocab_size=512, d_model=args.d_model, n_layer=args.layers,
                                n_head=8, n_kv_head=4, max_seq_len=256)


def serve_start(work: Path, checkpoint: Path, cache: Path | None, name: str) -> dict:
    """One `bastion serve` process: seconds to /ready, one completion, SIGTERM."""
    import signal

    import httpx

    port = _free_port()
    cmd = [sys.executable, "-m", "bastion.cli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
           "--set", "serve.threads=1", "--set", "serve.max_concurrency=8"]
    if cache is not None:
        cmd += ["--compile", "--compile-cache", str(cache)]
    env = {**os.environ, "XDG_CONFIG_HOME": str(work / "config"), "PYTHONPATH": str(ROOT)}
    env.pop("BASTION_API_KEYS", None)
    url = f"http://127.0.0.1:{port}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        with httpx.Client() as client:  # one client: polling costs little CPU beside the server's start
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"{name}: bastion serve exited {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
                try:
                    if client.get(url + "/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - start > 1800:
                    raise SystemExit(f"{name}: not ready after 30 minutes")
                time.sleep(0.25)
        ready = time.perf_counter() - start
        reply = httpx.post(url + "/v1/completions", timeout=300, json={
            "model": httpx.get(url + "/v1/models").json()["data"][0]["id"], "prompt": "reverse: a b c",
            "max_tokens": 16, "temperature": 0}).json()
        proc.send_signal(signal.SIGTERM)
        notes = [line.removeprefix("bastion serve: ") for line in proc.communicate(timeout=120)[1].splitlines()
                 if line.startswith("bastion serve: compile")]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"ready_s": ready, "cpu_s": cpu, "text": reply["choices"][0]["text"], "notes": notes}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def decode_child(args: argparse.Namespace) -> None:
    """Eager vs compiled engines on one model, side by side; prints a JSON line."""
    import torch

    from bench_models import NoEos

    from bastion.config.schema import GenerateConfig
    from bastion.infer.engine import Engine
    from bastion.infer.loading import load_for_inference

    loaded = load_for_inference(args.data)
    tok = NoEos(loaded.tokenizer)
    limits = GenerateConfig(max_new_tokens=args.tokens, max_new_tokens_ceiling=args.tokens, temperature=0.0)
    engines = {kind: Engine(loaded.model, tok, limits, max_batch_size=args.streams, threads=1,
                            compile=kind == "compiled") for kind in ("eager", "compiled")}
    for engine in engines.values():
        engine.start()
    one = [tok.encode("reverse: a b c d e f g h")]
    many = [tok.encode(f"reverse: {i} a b c") for i in range(args.streams)]
    rates: dict[str, list[float]] = {}
    outputs: dict[str, list] = {}
    for _ in range(args.rounds + 1):  # the first round warms up
        for label, prompts in (("1 stream", one), (f"{args.streams} streams", many)):
            for kind, engine in engines.items():
                begin = time.perf_counter()
                handles = [engine.submit(p, engine.params(len(p), max_new_tokens=args.tokens)) for p in prompts]
                ids = [h.result(timeout=1800).token_ids for h in handles]
                rate = sum(map(len, ids)) / (time.perf_counter() - begin)
                rates.setdefault(f"{label}, {kind}", []).append(rate)
                outputs[f"{label}, {kind}"] = ids
    for engine in engines.values():
        engine.shutdown()
    step_ms = decode_step_ms(loaded.model, engines, [1, args.streams], args.rounds)
    same = {label: outputs[f"{label}, eager"] == outputs[f"{label}, compiled"]
            for label in ("1 stream", f"{args.streams} streams")}
    print(json.dumps({"rates": {k: statistics.median(v[1:]) for k, v in rates.items()}, "same_tokens": same,
                      "step_ms": step_ms,
                      "tile_rows": {k: e._tile_rows for k, e in engines.items()}, "torch": torch.__version__}))


def decode_step_ms(model, engines: dict, row_counts: list[int], rounds: int) -> dict[str, float]:
    """Milliseconds per `decode_rows` call alone (no scheduling, sampling or detokenizing),
    through each engine's pieces, P rows at positions 64..191."""
    import torch

    times: dict[str, list[float]] = {}
    with torch.inference_mode():
        for rows in row_counts:
            caches = [model.new_cache(1, max_len=192) for _ in range(rows)]
            for _ in range(rounds + 1):
                for kind, engine in engines.items():
                    begin = time.perf_counter()
                    for position in range(64, 192):
                        model.decode_rows(list(range(rows)), caches, [position] * rows, rows, engine.row_steps)
                    times.setdefault(f"P={rows}, {kind}", []).append((time.perf_counter() - begin) / 128 * 1e3)
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def serve_main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-serve-compile-"))
    try:
        checkpoint, cache = serve_checkpoint(work, args), work / "cache"
        runs: dict[str, list[dict]] = {"eager": [], "cold": [], "warm": []}
        for _ in range(args.rounds):
            shutil.rmtree(cache, ignore_errors=True)
            for kind in ("eager", "cold", "warm"):
                record = serve_start(work, checkpoint, None if kind == "eager" else cache, kind)
                runs[kind].append(record)
                print(f"{kind:5}  ready {record['ready_s']:6.1f} s  cpu {record['cpu_s']:6.1f} s  | "
                      f"{'; '.join(n[:100] for n in record['notes'])}", flush=True)
            assert runs["warm"][-1]["text"] == runs["cold"][-1]["text"], "warm start answered differently"
            assert any(n.startswith("compile cache hit") for n in runs["warm"][-1]["notes"]), runs["warm"][-1]
        medians = {kind: {m: statistics.median(r[m] for r in rs) for m in ("ready_s", "cpu_s")}
                   for kind, rs in runs.items()}
        print("start-up to /ready (median): " + ", ".join(
            f"{kind} {m['ready_s']:.1f} s ({m['cpu_s']:.1f} cpu s)" for kind, m in medians.items())
              + f"; warm / cold {medians['warm']['ready_s'] / medians['cold']['ready_s']:.2f}x")
        cmd = [sys.executable, __file__, "--decode-child", "--data", str(checkpoint), "--tokens", str(args.tokens),
               "--streams", str(args.streams), "--rounds", str(args.decode_rounds)]
        done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                              timeout=7200, check=False)
        if done.returncode:
            raise SystemExit(f"decode bench failed:\n{done.stderr[-3000:]}")
        decode = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"decode tokens/s (median of {args.decode_rounds}; tile rows {decode['tile_rows']}):")
        for label in ("1 stream", f"{args.streams} streams"):
            eager, compiled = decode["rates"][f"{label}, eager"], decode["rates"][f"{label}, compiled"]
            print(f"  {label:<10} eager {eager:7.1f}  compiled {compiled:7.1f}  compiled / eager "
                  f"{compiled / eager:.2f}x  same tokens: {decode['same_tokens'][label]}")
        for rows in (1, args.streams):
            eager, compiled = decode["step_ms"][f"P={rows}, eager"], decode["step_ms"][f"P={rows}, compiled"]
            print(f"  decode_rows alone, P={rows}: eager {eager:.2f} ms  compiled {compiled:.2f} ms  "
                  f"eager / compiled {eager / compiled:.2f}x")
        if args.json:
            args.json.write_text(json.dumps({"starts": runs, "start_medians": medians, "decode": decode,
                                             "shape": [args.d_model, args.layers]}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="model preset (bastion/config/presets.py)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=1, help="cold/warm pairs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--serve", action="store_true", help="bench serve.compile and serve.compile_cache instead")
    parser.add_argument("--d-model", type=int, default=256, help="--serve: the model's width")
    parser.add_argument("--layers", type=int, default=4, help="--serve: the model's depth")
    parser.add_argument("--tokens", type=int, default=64, help="--serve: tokens per request in the decode bench")
    parser.add_argument("--streams", type=int, default=8, help="--serve: concurrent streams in the decode bench")
    parser.add_argument("--decode-rounds", type=int, default=3, help="--serve: decode bench rounds")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--decode-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.decode_child:
        return decode_child(args)
    if args.serve:
        return serve_main(args)
    work = Path(tempfile.mkdtemp(prefix="bench-compile-cache-"))
    try:
        data, cache, runs = prepare(work), work / "cache", {"cold": [], "warm": []}
        for round_ in range(args.rounds):
            shutil.rmtree(cache, ignore_errors=True)
            for kind in ("cold", "warm"):
                record = run_once(args, work, data, cache, f"{kind}{round_}")
                runs[kind].append(record)
                print(f"{kind:4}  first step {record['first_step_s']:7.1f} s  run {record['run_s']:7.1f} s  "
                      f"cpu {record['cpu_s']:7.1f} s  | {'; '.join(e[:90] for e in record['events'])}", flush=True)
            assert runs["warm"][-1]["losses"] == runs["cold"][-1]["losses"], "warm run trained differently"
            assert any(e.startswith("hit") for e in runs["warm"][-1]["events"]), runs["warm"][-1]["events"]
        summary = {m: statistics.median(r[m] for r in runs["warm"]) / statistics.median(r[m] for r in runs["cold"])
                   for m in ("first_step_s", "run_s", "cpu_s")}
        print("warm / cold (median): " + ", ".join(f"{m} {v:.2f}x" for m, v in summary.items()))
        if args.json:
            args.json.write_text(json.dumps({"runs": runs, "warm_over_cold": summary, "preset": args.preset}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
