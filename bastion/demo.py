"""`bastion demo`: the whole pipeline on a corpus every machine with Python has — the
standard library's own source code. Prepare -> train -> checkpoint -> plot -> sample."""
from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

from rich.console import Console
from rich.text import Text

from bastion.config import build_config
from bastion.data import prepare_dataset
from bastion.data.cli import print_report
from bastion.data.shards import TokenShards
from bastion.errors import BastionError
from bastion.eval import unigram_cross_entropy
from bastion.infer import generate
from bastion.infer.loading import load_for_inference
from bastion.train import train
from bastion.train.metrics import plot_run

# Top-level modules plus a few packages: about 6.5 MB of real Python, ~2M tokens.
STDLIB_PARTS = ["*.py", "asyncio/*.py", "email/*.py", "http/*.py", "json/*.py", "logging/*.py",
                "collections/*.py", "concurrent/futures/*.py", "urllib/*.py", "importlib/*.py"]
PROMPTS = ["def fibonacci(n):\n", "import os\n", "class Stack:\n    def __init__(self", "    for i in range("]


def demo_config(out_dir: Path, steps: int):
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise BastionError(f"the Python standard library was not found at {stdlib}")
    return build_config({
        "model": {"preset": "mini"},
        "data": {
            "sources": [str(stdlib / part) for part in STDLIB_PARTS],
            "text_suffixes": [".py"],
            "output_dir": str(out_dir / "data"),
            "allowed_roots": [str(stdlib), str(out_dir)],  # read the stdlib, write only under --out
            "val_fraction": 0.05,
            "tokenizer": {"vocab_size": 4096},
        },
        "train": {
            "data_dir": str(out_dir / "data"), "out_dir": str(out_dir / "run"), "run_name": "demo",
            "seq_len": 256, "batch_size": 16, "max_steps": steps, "lr": 2e-3, "warmup_steps": min(50, steps // 10),
            "eval_every": max(1, steps // 6), "eval_batches": 8, "log_every": 10, "dtype": "float32",
        },
        "checkpoint": {"every_steps": max(1, steps // 3), "keep_last": 2},
        "generate": {"max_new_tokens": 48, "temperature": 0.7, "top_k": 40},
    }, source="demo config")


def run_demo(out_dir: Path, steps: int = 600, quiet: bool = False, console: Console | None = None) -> dict:
    console = console or Console()
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not (out_dir / "run").exists() and not (out_dir / "data").exists() and any(out_dir.iterdir()):
            raise BastionError(f"{out_dir} exists and is not a demo folder; choose another --out")
        shutil.rmtree(out_dir)
    cfg = demo_config(out_dir, steps)

    console.rule("1. data: the Python standard library")
    print_report(prepare_dataset(cfg.data), console)
    baseline = unigram_cross_entropy(TokenShards(cfg.train.data_dir, "train"), TokenShards(cfg.train.data_dir, "val"))

    console.rule(f"2. train: '{'mini'}' model, {steps} steps")
    result = train(cfg, quiet=quiet)
    plot = plot_run(result.run_dir)

    console.rule("3. samples")
    loaded = load_for_inference(result.checkpoint)
    for prompt in PROMPTS:
        sample = generate(loaded.model, loaded.tokenizer, prompt, limits=loaded.config.generate, seed=0)
        console.print(Text(repr(prompt), style="bold cyan"), "-> ", end="")
        console.print(prompt + sample.text, markup=False, highlight=False)
        console.print()

    console.rule("summary")
    val = result.final_val_loss
    console.print(f"unigram baseline (val): {baseline:.3f} nats/token")
    console.print(f"model validation loss : {val:.3f} nats/token  ({baseline - val:+.3f} better than the baseline)"
                  if val is not None else "model validation loss : n/a")
    console.print(f"loss curve            : {plot}")
    console.print(f"checkpoint            : {result.checkpoint}")
    console.print(f"try: bastion generate --checkpoint {result.checkpoint} --prompt 'def main():'")
    return {"baseline": baseline, "val_loss": val, "checkpoint": result.checkpoint, "plot": plot}
