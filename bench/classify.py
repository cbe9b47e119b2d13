"""Text classification: Bastion `train.objective classify` vs transformers
`LlamaForSequenceClassification` with a plain PyTorch loop, same model, same data, one run.

Both sides start from the same weights: a Llama built here (random, the language model of
a real run would be `bastion import hf`'d) with a zero K-class score head in place of the lm
head (Bastion's start; the HF head is zeroed to match). Both see the very same batches
(Bastion's labelled-text batches: right-padded, seeded order), AdamW with the same settings
(constant lr, no weight decay, no clipping), float32. The data is tests/synthetic/labelled.py:
three classes, each marked by one word among random filler words.

Reported per side: steady-state training throughput (examples/s, after --warmup steps;
set-up and evaluation excluded) and accuracy / macro-F1 on a held-out set after training,
and the ratio of the throughputs. Rounds alternate the sides; medians.

Then, unless --skip-fusion: fused vs text-only accuracy on the synthetic interaction set
(audio x visual), both through `bastion train` (bench/fusion.py).

    python bench/classify.py                        # CPU defaults (~2 min on 2 cores, + the fusion part)
    python bench/classify.py --device cuda --d-model 1024 --layers 12 --steps 300 --skip-fusion
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic data: test fixtures
sys.path.insert(0, str(Path(__file__).resolve().parent))

import os  # noqa: E402

import fusion  # noqa: E402  (bench/fusion.py)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; nothing is downloaded

LABELS = ["neg", "neu", "pos"]
SEQ_LEN = 64


def prepare(work: Path, args: argparse.Namespace) -> None:
    from bench_models import random_model_both_sides
    from synthetic.chat import write_jsonl
    from synthetic.labelled import classify_records

    train, test = classify_records(args.examples, seed=1), classify_records(args.test_examples, seed=2)
    random_model_both_sides(work, [r["text"] for r in train] * 2, vocab=args.vocab, d_model=args.d_model,
                            layers=args.layers, heads=args.heads)
    write_jsonl(work / "train.jsonl", train)
    write_jsonl(work / "test.jsonl", test)


def bastion_config(work: Path, args: argparse.Namespace, out: str):
    from bastion.config import build_config

    return build_config({
        "train": {"objective": "classify", "out_dir": str(work / out), "seq_len": SEQ_LEN,
                  "batch_size": args.batch_size, "max_steps": args.warmup + args.steps, "lr": args.lr,
                  "warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": 0.0, "grad_clip": None, "log_every": 10**6,
                  "eval_every": 10**8, "device": args.device, "dtype": "float32", "seed": 0},
        "finetune": {"init_from": str(work / "base"), "train_file": str(work / "train.jsonl"), "max_length": SEQ_LEN,
                     "sequence": {"labels": LABELS}},
        "data": {"allowed_roots": [str(work)]},
        "checkpoint": {"every_steps": 10**8, "keep_last": 1},
    })


def _steady(stamps: list[float], per_step: int, warmup: int) -> float:
    """Examples per second over the steps after `warmup` (stamps[i]: end of step i + 1)."""
    return per_step * (len(stamps) - warmup - 1) / (stamps[-1] - stamps[warmup])


def run_bastion(work: Path, args: argparse.Namespace) -> dict:
    from bastion.eval.classify import eval_labels
    from bastion.train import train

    stamps: list[float] = []

    def stamp(step: int) -> bool:
        stamps.append(time.perf_counter())
        return False

    cfg = bastion_config(work, args, f"run_{time.time_ns()}")
    result = train(cfg, quiet=True, should_stop=stamp)
    metrics = eval_labels(result.checkpoint, work / "test.jsonl", roots=[str(work)], batch_size=32, device=args.device)
    return {"examples_per_s": _steady(stamps, args.batch_size, args.warmup), "accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"]}


def run_hf(work: Path, args: argparse.Namespace) -> dict:
    """LlamaForSequenceClassification (zero score head, as Bastion starts) on Bastion's batches."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification

    from bastion.checkpoint import load_checkpoint
    from bastion.checkpoint.contents import checkpoint_tokenizer
    from bastion.data.labelled import LabelSpec, load_labelled
    from bastion.train.label_metrics import classification_metrics

    cfg = bastion_config(work, args, "unused")
    tok = checkpoint_tokenizer(load_checkpoint(work / "base", load_optimizer=False))
    spec = LabelSpec("classify", names=tuple(LABELS))
    data = load_labelled(work / "train.jsonl", tok, spec, cfg.finetune, [str(work)])
    test = load_labelled(work / "test.jsonl", tok, spec, cfg.finetune, [str(work)])
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        work / "hf", num_labels=len(LABELS), dtype=torch.float32, attn_implementation="sdpa").to(device)
    with torch.no_grad():
        model.score.weight.zero_()
    model.train()
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                                  fused=fused)
    cursor = data.cursor(args.batch_size, SEQ_LEN, seed=0)
    stamps = []
    for _ in range(args.warmup + args.steps):
        batch = cursor.next_batch(device)
        ids = batch["input_ids"]
        logits = model(input_ids=ids, attention_mask=(ids != data.pad_id).long()).logits
        loss = F.cross_entropy(logits.float(), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # sync, as the Bastion loop does when it reads a loss
        stamps.append(time.perf_counter())
    model.eval()
    scores, labels = [], []
    with torch.no_grad():
        for batch in test.batches(32, SEQ_LEN, seed=0, epoch=0, shuffle=False):
            ids = batch["input_ids"].to(device)
            scores.append(model(input_ids=ids, attention_mask=(ids != test.pad_id).long()).logits.float().cpu())
            labels.append(batch["labels"])
    metrics = classification_metrics(torch.cat(scores).numpy(), torch.cat(labels).numpy())
    return {"examples_per_s": _steady(stamps, args.batch_size, args.warmup), **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--d-model", type=int, default=256, help="model width")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary trained on the data")
    parser.add_argument("--examples", type=int, default=2000, help="training texts")
    parser.add_argument("--test-examples", type=int, default=300, help="held-out texts")
    parser.add_argument("--batch-size", type=int, default=16, help="texts per step")
    parser.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate, constant")
    parser.add_argument("--steps", type=int, default=150, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of both sides, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip-fusion", action="store_true", help="skip fused vs text-only on the interaction set")
    fusion.add_arguments(parser)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench-classify-"))
    prepare(work, args)
    results: dict[str, list[dict]] = {"bastion": [], "transformers": []}
    for _ in range(args.rounds):
        results["bastion"].append(run_bastion(work, args))
        results["transformers"].append(run_hf(work, args))
    print(f"model d_model={args.d_model} layers={args.layers} heads={args.heads} vocab={args.vocab}, "
          f"{len(LABELS)} classes, batch {args.batch_size}, {args.steps} timed steps, device {args.device} fp32, "
          f"{args.rounds} round(s), medians")
    print(f"{'side':<14} {'examples/s':>11} {'accuracy':>9} {'macro-F1':>9}")
    med = {side: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for side, rows in results.items()}
    for side, m in med.items():
        print(f"{side:<14} {m['examples_per_s']:>11.1f} {m['accuracy']:>9.3f} {m['macro_f1']:>9.3f}")
    print(f"throughput ratio Bastion / transformers: "
          f"{med['bastion']['examples_per_s'] / med['transformers']['examples_per_s']:.2f}x")
    if not args.skip_fusion:
        print()
        fusion.compare(args)


if __name__ == "__main__":
    main()
