"""Fine-tuning throughput and memory: Bastion vs transformers + peft (+ TRL for DPO).

Same model (a Llama built here, exported with `bastion export hf` so both sides load the
same weights), same chat data, same LoRA settings (rank 16, alpha 32, q/k/v/o), same
batch size, AdamW, in one run. Each job runs in its own subprocess so its peak memory
(ru_maxrss: the whole process, Python and torch included) is its own; jobs alternate
round by round so machine noise hits every side alike.

    lora-sft   Bastion: `bastion.train.train` (objective sft, LoRA, rows not packed, so
               both sides see exactly the same padded batches)
               baseline: transformers LlamaForCausalLM + peft get_peft_model, a plain
               PyTorch loop over the very same batches (the leanest HF loop there is)
    lora-dpo   Bastion: objective dpo, LoRA; reference log-probs computed once up front
               baseline: TRL DPOTrainer with a peft config and precompute_ref_log_probs=True
               (the same algorithm; TRL's default instead re-runs the reference each step)

Throughput counts steady-state steps only (after `--warmup` steps; set-up, data loading
and reference precomputation excluded on both sides): tokens/s for SFT (non-padding
tokens), pairs/s for DPO (TRL tokenizes its own way, so pairs are the common unit).

    python bench/finetune.py                     # CPU defaults (~3 min on 2 cores)
    python bench/finetune.py --device cuda --d-model 1024 --layers 16 --steps 50
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic data: test fixtures

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built here; nothing is downloaded
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

LORA = {"rank": 16, "alpha": 32.0, "targets": ["wq", "wk", "wv", "wo"]}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ---- set-up (parent process) ----------------------------------------------------------------


def prepare(work: Path, args: argparse.Namespace) -> None:
    from bench_models import random_model_both_sides
    from synthetic.chat import greeting_preference_records, reverse_chat_records, write_jsonl

    sft = reverse_chat_records(args.examples, seed=1, min_len=8, max_len=24)
    prefs = greeting_preference_records(args.examples, seed=1)
    texts = [m["content"] for r in sft for m in r["messages"]] + [json.dumps(r) for r in prefs]
    random_model_both_sides(work, texts, vocab=args.vocab, d_model=args.d_model, layers=args.layers,
                            heads=args.heads)
    write_jsonl(work / "sft.jsonl", sft)
    write_jsonl(work / "pref.jsonl", prefs)


def bastion_config(work: Path, args: argparse.Namespace, objective: str, out: str):
    from bastion.config import build_config

    return build_config({
        "train": {"objective": objective, "out_dir": str(work / out), "seq_len": 128, "batch_size": args.batch_size,
                  "max_steps": args.warmup + args.steps, "lr": 1e-4, "warmup_steps": 0, "weight_decay": 0.0,
                  "grad_clip": None, "log_every": 1, "eval_every": 10**8, "device": args.device,
                  "dtype": "bfloat16" if args.bf16 else "float32", "seed": 0},
        "finetune": {"init_from": str(work / "base"), "train_file": str(work / f"{'sft' if objective == 'sft' else 'pref'}.jsonl"),
                     "max_length": 128, "pack": False,
                     "lora": {"enabled": True, "rank": LORA["rank"], "alpha": LORA["alpha"], "target_modules": LORA["targets"]},
                     "preference": {"beta": 0.1}},
        "data": {"allowed_roots": [str(work)]},
        "checkpoint": {"every_steps": 10**8, "keep_last": 1},
    })


# ---- jobs (one subprocess each) --------------------------------------------------------------


def _steady(stamps: list[float], counts: list[float], warmup: int) -> float:
    """Units per second over the steps after `warmup` (stamps[i]: end of step i + 1)."""
    return sum(counts[warmup + 1:]) / (stamps[-1] - stamps[warmup])


def job_bastion(work: Path, args: argparse.Namespace, objective: str) -> dict:
    from bastion.train import train

    stamps: list[float] = []

    def stamp(step: int) -> bool:
        stamps.append(time.perf_counter())
        return False

    cfg = bastion_config(work, args, objective, f"run_{objective}_{time.time_ns()}")
    train(cfg, quiet=True, should_stop=stamp)
    rows = [json.loads(line) for line in (Path(cfg.train.out_dir) / "metrics.jsonl").read_text().splitlines()]
    tokens = [r["tokens"] for r in rows if r["kind"] == "train"]
    per_step = [b - a for a, b in zip([0] + tokens[:-1], tokens)]
    if objective == "sft":
        return {"tokens_per_s": _steady(stamps, per_step, args.warmup)}
    return {"pairs_per_s": _steady(stamps, [args.batch_size] * len(stamps), args.warmup)}


def job_hf_sft(work: Path, args: argparse.Namespace) -> dict:
    """transformers + peft on Bastion's own batches (identical ids, labels and padding)."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bastion.data.finetune import load_sft
    from bastion.checkpoint.contents import checkpoint_chat, checkpoint_tokenizer
    from bastion.checkpoint import load_checkpoint

    cfg = bastion_config(work, args, "sft", "unused")
    base = load_checkpoint(work / "base", load_optimizer=False)
    chat = checkpoint_chat(base, checkpoint_tokenizer(base))
    data = load_sft(cfg.finetune.train_file, chat, cfg.finetune, cfg.data.allowed_roots)
    cursor = data.cursor(args.batch_size, 128, seed=0)
    device = torch.device(args.device)
    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa").to(device)
    model = get_peft_model(model, LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules=HF_TARGETS,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    stamps, counts = [], []
    for _ in range(args.warmup + args.steps):
        batch = cursor.next_batch(device)
        with autocast:
            logits = model(input_ids=batch["input_ids"]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # sync, as the Bastion loop does when it logs every step
        stamps.append(time.perf_counter())
        counts.append(int(batch["num_tokens"]))
    return {"tokens_per_s": _steady(stamps, counts, args.warmup)}


def job_trl_dpo(work: Path, args: argparse.Namespace) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    records = [json.loads(line) for line in (work / "pref.jsonl").read_text().splitlines()]
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32, attn_implementation="sdpa")
    tokenizer = AutoTokenizer.from_pretrained(work / "hf")
    config = DPOConfig(output_dir=str(work / f"trl_{time.time_ns()}"), per_device_train_batch_size=args.batch_size,
                       max_steps=args.warmup + args.steps, learning_rate=1e-4, lr_scheduler_type="constant",
                       warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0, beta=0.1, max_length=128,
                       precompute_ref_log_probs=True, logging_steps=10**6, save_strategy="no", report_to="none",
                       use_cpu=args.device == "cpu", bf16=args.bf16, seed=0, dataloader_num_workers=0,
                       disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
                         peft_config=LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], target_modules=HF_TARGETS,
                                                lora_dropout=0.0, task_type="CAUSAL_LM"),
                         callbacks=[Stamp()])
    trainer.train()
    return {"pairs_per_s": _steady(stamps, [args.batch_size] * len(stamps), args.warmup)}


def run_job(name: str, work: Path, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads or torch.get_num_threads())
    result = {"lora-sft/bastion": lambda: job_bastion(work, args, "sft"),
              "lora-sft/hf+peft": lambda: job_hf_sft(work, args),
              "lora-dpo/bastion": lambda: job_bastion(work, args, "dpo"),
              "lora-dpo/trl": lambda: job_trl_dpo(work, args)}[name]()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if args.device == "cuda":
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
    return result | {"peak_rss_bytes": peak}


# ---- orchestration ---------------------------------------------------------------------------


JOBS = {"lora-sft": ("lora-sft/bastion", "lora-sft/hf+peft"), "lora-dpo": ("lora-dpo/bastion", "lora-dpo/trl")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per job")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", choices=list(JOBS), default=None)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.job:  # child process
        print(json.dumps(run_job(args.job, Path(args.work), args)))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-finetune-"))
    prepare(work, args)
    passthrough = [a for a in sys.argv[1:]]
    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for family, names in JOBS.items():
            if args.only and family != args.only:
                continue
            for name in names:
                proc = subprocess.run([sys.executable, __file__, *passthrough, "--job", name, "--work", str(work)],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
                results.setdefault(name, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))

    print(f"model d_model={args.d_model} layers={args.layers} heads={args.heads} vocab={args.vocab}, "
          f"batch {args.batch_size}, LoRA r{LORA['rank']} on q/k/v/o, device {args.device}"
          f"{' bf16' if args.bf16 else ' fp32'}, {args.steps} timed steps x {args.rounds} rounds (median)")
    print(f"{'job':<20} {'throughput':>16} {'peak RSS':>10} {'vs baseline':>12} {'memory vs':>10}")
    for family, (ours, theirs) in JOBS.items():
        if ours not in results:
            continue
        unit = "tokens_per_s" if family == "lora-sft" else "pairs_per_s"
        med = {n: statistics.median(r[unit] for r in results[n]) for n in (ours, theirs)}
        mem = {n: max(r["peak_rss_bytes"] for r in results[n]) for n in (ours, theirs)}
        for n in (ours, theirs):
            ratio = f"{med[n] / med[theirs]:.2f}x" if n == ours else ""
            mratio = f"{mem[n] / mem[theirs]:.2f}x" if n == ours else ""
            print(f"{n:<20} {med[n]:>10.1f} {unit.split('_')[0]}/s {mem[n] / 2**20:>8.0f}Mi {ratio:>12} {mratio:>10}")


if __name__ == "__main__":
    main()
