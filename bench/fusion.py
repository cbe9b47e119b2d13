"""Multimodal fusion vs text only on the synthetic interaction set (issue 17, part 2).

The data is tests/synthetic/multimodal.py's `audio_visual` source, written in the real layout
(`<split>.jsonl`, `<split>.audio.safetensors`, `<split>.visual.safetensors`) and read back
through bastion/data/features.py: the label is the XOR of the signs of the audio and the
visual frames along hidden directions, the text is random filler. Both sides are the same
small scoring transformer (bastion/model/transformer.py with a 2-class `score` head) plus
bastion/model/fusion.py, same seed, same batches, AdamW at a constant lr; the text-only side
gives the fusion no modality (it then returns the text states unchanged, bit for bit), so the
difference is the modalities alone. Reported: held-out accuracy of each, and of the fused
model with each stream removed at evaluation (the ablation). Seeds are run in turn; medians.

Fusion is not yet wired into `bastion train` (docs/multimodal.md), so this is a hand loop on
the model modules, as tests/model/test_fusion.py trains them.

    python bench/fusion.py                  # CPU, about a minute on 2 cores
    python bench/fusion.py --steps 400 --d-model 64 --seeds 3
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic data: test fixtures

import torch  # noqa: E402

MAX_FRAMES = 12
TEXT_TOKENS = 24
VOCAB = 64


def load_split(folder: Path, split: str, n: int, seed: int) -> dict:
    from bastion.config import build_config
    from bastion.data.features import read_split_features
    from synthetic.multimodal import FEATURES, write_multimodal_split

    jsonl = write_multimodal_split(folder, split, n, "audio_visual", seed=seed, max_frames=MAX_FRAMES)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    modalities = {m: {"features": size, "max_frames": MAX_FRAMES} for m, size in FEATURES.items()}
    cfg = build_config({"finetune": {"sequence": {"modalities": modalities}}})
    streams = read_split_features(jsonl, cfg.finetune.sequence.modalities, [folder], max_bytes=2**26,
                                  ids={r["id"] for r in records})
    ids = torch.zeros(len(records), TEXT_TOKENS, dtype=torch.long)  # byte-level ids, pad 0
    for row, r in enumerate(records):
        codes = [1 + b % (VOCAB - 1) for b in r["text"].encode()][:TEXT_TOKENS]
        ids[row, : len(codes)] = torch.tensor(codes)
    labels = torch.tensor([r["label"] == "pos" for r in records], dtype=torch.long)
    return {"ids": ids, "labels": labels, "frames": {m: [streams[m].get(r["id"]) for r in records] for m in FEATURES}}


def batches(data: dict, rows: list[int], use: tuple[str, ...]) -> dict:
    from bastion.model.fusion import pad_frames
    from synthetic.multimodal import FEATURES

    return {m: pad_frames([data["frames"][m][i] for i in rows], FEATURES[m]) for m in use}


def build(args: argparse.Namespace, seed: int):
    from bastion.config import build_config
    from bastion.model import Transformer
    from bastion.model.fusion import Fusion
    from synthetic.multimodal import FEATURES

    torch.manual_seed(seed)
    cfg = build_config({"model": {"vocab_size": VOCAB, "d_model": args.d_model, "n_layer": args.layers, "n_head": 4,
                                  "n_kv_head": 2, "max_seq_len": 32, "score_labels": 2}, "train": {"seq_len": 32}})
    return Transformer(cfg.model), Fusion({m: (size, MAX_FRAMES) for m, size in FEATURES.items()}, args.d_model)


def train(args: argparse.Namespace, data: dict, seed: int, use: tuple[str, ...]):
    from bastion.model.fusion import fused_scores

    model, fusion = build(args, seed)
    opt = torch.optim.AdamW([*model.parameters(), *fusion.parameters()], lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(args.steps):
        rows = torch.randint(0, len(data["labels"]), (args.batch_size,), generator=gen).tolist()
        scores = fused_scores(model, fusion, data["ids"][rows], 0, batches(data, rows, use))
        loss = torch.nn.functional.cross_entropy(scores, data["labels"][rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), fusion.eval()


@torch.no_grad()
def accuracy(model, fusion, data: dict, use: tuple[str, ...]) -> float:
    from bastion.model.fusion import fused_scores

    rows = list(range(len(data["labels"])))
    scores = fused_scores(model, fusion, data["ids"], 0, batches(data, rows, use))
    return (scores.argmax(-1) == data["labels"]).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=400, help="training examples (default 400)")
    parser.add_argument("--test-examples", type=int, default=400, help="held-out examples (default 400)")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per side (default 200)")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step (default 32)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate, constant (default 3e-3)")
    parser.add_argument("--d-model", type=int, default=32, help="model width (default 32)")
    parser.add_argument("--layers", type=int, default=1, help="transformer layers (default 1)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds run in turn; medians (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    both = ("audio", "visual")
    results: dict[str, list[float]] = {"text only": [], "fused": [], "fused, audio removed": [],
                                       "fused, visual removed": []}
    with tempfile.TemporaryDirectory() as tmp:
        train_data = load_split(Path(tmp), "train", args.examples, seed=11)
        test_data = load_split(Path(tmp), "test", args.test_examples, seed=11)  # same hidden directions
        for seed in range(args.seeds):
            results["text only"].append(accuracy(*train(args, train_data, seed, ()), test_data, ()))
            model, fusion = train(args, train_data, seed, both)
            results["fused"].append(accuracy(model, fusion, test_data, both))
            results["fused, audio removed"].append(accuracy(model, fusion, test_data, ("visual",)))
            results["fused, visual removed"].append(accuracy(model, fusion, test_data, ("audio",)))
            print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in results.items()), flush=True)
    print("\n| model | held-out accuracy (median) |\n|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(values):.3f} |")


if __name__ == "__main__":
    main()
