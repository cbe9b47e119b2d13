"""Multimodal fusion vs text only on the synthetic interaction set, both through `bastion train`.

The data is tests/synthetic/multimodal.py's `audio_visual` source in the real layout
(`<split>.jsonl` with ids, `<split>.audio.safetensors`, `<split>.visual.safetensors`): the
label is the XOR of the signs of the audio and the visual frames along hidden directions, the
text is random filler. Both sides start from the same small random language model (the
checkpoint a real run would `bastion import hf`) and run the same `train.objective classify`
config, same seed, same batches; the fused side adds `finetune.sequence.modalities` (and so
bastion/model/fusion.py), the text-only side reads the same JSONL without them. Reported:
held-out accuracy of each (`bastion eval classify`), and of the fused model with each stream
removed at evaluation (`--without`, the ablation). Seeds run in turn; medians.

    python bench/fusion.py                  # CPU, a few minutes on 2 cores
    python bench/fusion.py --steps 400 --d-model 64 --seeds 3
bench/classify.py runs the same comparison after its throughput comparison.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic data: test fixtures

MAX_FRAMES = 12
SEQ_LEN = 64


def prepare(work: Path, args: argparse.Namespace) -> None:
    from helpers import make_base_checkpoint
    from synthetic.multimodal import write_multimodal_split

    make_base_checkpoint(work / "base", d_model=args.fusion_d_model, n_layer=args.fusion_layers)
    write_multimodal_split(work / "data", "train", args.fusion_examples, "audio_visual", seed=11, max_frames=MAX_FRAMES)
    write_multimodal_split(work / "data", "test", args.fusion_test_examples, "audio_visual", seed=11,
                           max_frames=MAX_FRAMES)  # same seed: the same hidden directions


def run_side(work: Path, args: argparse.Namespace, seed: int, fused: bool) -> dict[str, float]:
    from bastion.config import build_config
    from bastion.eval.classify import eval_labels
    from bastion.train.loop import train
    from synthetic.multimodal import FEATURES, LABELS

    modalities = {m: {"features": size, "max_frames": MAX_FRAMES} for m, size in FEATURES.items()} if fused else {}
    base = next((work / "base").glob("step_*"))
    cfg = build_config({
        "train": {"objective": "classify", "out_dir": str(work / f"run-{seed}-{fused}"), "seq_len": SEQ_LEN,
                  "batch_size": args.fusion_batch_size, "max_steps": args.fusion_steps, "lr": args.fusion_lr,
                  "warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": 0.0, "log_every": 10**6,
                  "eval_every": 10**8, "device": "cpu", "dtype": "float32", "seed": seed},
        "finetune": {"init_from": str(base), "train_file": str(work / "data" / "train.jsonl"), "max_length": SEQ_LEN,
                     "sequence": {"labels": LABELS, "modalities": modalities}},
        "data": {"allowed_roots": [str(work)]},
        "checkpoint": {"every_steps": 10**6, "keep_last": 1}})
    ckpt = train(cfg, quiet=True).checkpoint
    test = work / "data" / "test.jsonl"
    out = {"accuracy": eval_labels(ckpt, test, roots=[str(work)])["accuracy"]}
    if fused:
        for gone in FEATURES:
            out[f"without {gone}"] = eval_labels(ckpt, test, roots=[str(work)], without=[gone])["accuracy"]
    return out


def compare(args: argparse.Namespace) -> None:
    """Train both sides per seed, print one line per seed and a table of medians."""
    results: dict[str, list[float]] = {"text only": [], "fused": [], "fused, audio removed": [],
                                       "fused, visual removed": []}
    with tempfile.TemporaryDirectory(prefix="bench-fusion-") as tmp:
        work = Path(tmp)
        prepare(work, args)
        for seed in range(args.fusion_seeds):
            results["text only"].append(run_side(work, args, seed, fused=False)["accuracy"])
            fused = run_side(work, args, seed, fused=True)
            results["fused"].append(fused["accuracy"])
            results["fused, audio removed"].append(fused["without audio"])
            results["fused, visual removed"].append(fused["without visual"])
            print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in results.items()), flush=True)
    print(f"\nsynthetic interaction set (label = audio sign XOR visual sign), {args.fusion_examples} training / "
          f"{args.fusion_test_examples} held-out examples, d_model {args.fusion_d_model} x {args.fusion_layers} layer(s), "
          f"{args.fusion_steps} steps of {args.fusion_batch_size}, {args.fusion_seeds} seed(s), `bastion train`")
    print("| model | held-out accuracy (median) |\n|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.3f} |")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fusion-examples", type=int, default=480, help="interaction set: training examples")
    parser.add_argument("--fusion-test-examples", type=int, default=400, help="interaction set: held-out examples")
    parser.add_argument("--fusion-steps", type=int, default=250, help="interaction set: optimizer steps per side")
    parser.add_argument("--fusion-batch-size", type=int, default=32, help="interaction set: examples per step")
    parser.add_argument("--fusion-lr", type=float, default=3e-3, help="interaction set: AdamW lr, constant")
    parser.add_argument("--fusion-d-model", type=int, default=32, help="interaction set: model width")
    parser.add_argument("--fusion-layers", type=int, default=1, help="interaction set: transformer layers")
    parser.add_argument("--fusion-seeds", type=int, default=3, help="interaction set: seeds run in turn; medians")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    compare(args)


if __name__ == "__main__":
    main()
