"""`bastion eval generate`: prompts decoded together through the engine vs one at a time.

One run, one model (a random Llama-style model and chat tokenizer built here), one prompt
file of chat prompts. The baseline is the previous implementation: `generate()` for each
prompt in turn (same limits, same greedy decoding, same stop ids). Against it,
`eval_generate` at several batch sizes (the engine in its batch-invariant "padded" mode),
alternating round by round; wall time per run, medians. Completions per prompt are checked
to be identical across batch sizes.

    python bench/eval_generate.py                    # CPU defaults (~2 min on 2 cores)
    python bench/eval_generate.py --device cuda --d-model 1024 --layers 16 --prompts 256
"""
from __future__ import annotations

import argparse
import sys
import json
import statistics
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic data: test fixtures


def build(work: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    import torch

    from bastion.checkpoint import Checkpoint, save_checkpoint
    from bastion.config import build_config
    from bastion.config.load import to_yaml
    from synthetic.chat import held_out_reverse_prompts, reverse_chat_records, write_jsonl
    from bastion.model import Transformer
    from bastion.tokenizer import BastionTokenizer

    tok = BastionTokenizer.train([str(r) for r in reverse_chat_records(500, seed=1)], vocab_size=512, min_frequency=1)
    cfg = build_config({"model": {"vocab_size": tok.vocab_size, "d_model": args.d_model, "n_layer": args.layers,
                                  "n_head": 8, "n_kv_head": 4, "max_seq_len": 256},
                        "train": {"seq_len": 128}, "generate": {"max_new_tokens": args.tokens}})
    torch.manual_seed(0)
    ckpt = save_checkpoint(work / "model", 0, Checkpoint(model=Transformer(cfg.model).state_dict(), trainer_state={},
                                                         config_yaml=to_yaml(cfg), tokenizer_json=tok.to_json_str()))
    prompts = work / "prompts.jsonl"
    write_jsonl(prompts, [{"messages": m} for m, _ in held_out_reverse_prompts(args.prompts, seed=2)])
    return ckpt, prompts


def sequential(ckpt: Path, prompts: Path, device: str) -> list[str]:
    """The previous `eval_generate`: generate() for one prompt after another."""
    from bastion.infer.generate import generate
    from bastion.infer.loading import load_for_inference

    loaded = load_for_inference(ckpt, device=device)
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    return [generate(loaded.model, loaded.tokenizer, loaded.chat.encode_prompt(r["messages"]),
                     limits=loaded.config.generate, temperature=0.0, seed=i, stop_ids=loaded.chat.stop_ids).text
            for i, r in enumerate(records)]


def batched(ckpt: Path, prompts: Path, device: str, batch_size: int, n: int) -> list[str]:
    from bastion.eval.finetune import eval_generate

    result = eval_generate(ckpt, prompts, [{"name": "length", "min": 0, "max": 100000}], roots=[str(prompts.parent)],
                           device=device, batch_size=batch_size, keep_samples=n)
    return [s["completion"] for s in result.samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens per prompt")
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt, prompts = build(Path(tmp), args)
        times: dict[str, list[float]] = {"sequential generate()": [], **{f"eval_generate batch {b}": [] for b in sizes}}
        outputs: dict[str, list[str]] = {}
        for round_no in range(args.rounds):
            for name in times:
                start = time.perf_counter()
                if name.startswith("sequential"):
                    outputs[name] = sequential(ckpt, prompts, args.device)
                else:
                    outputs[name] = batched(ckpt, prompts, args.device, int(name.rsplit(" ", 1)[1]), args.prompts)
                times[name].append(time.perf_counter() - start)
            print(f"round {round_no}: " + "  ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)

    base = statistics.median(times["sequential generate()"])
    batched_outputs = [v for k, v in outputs.items() if not k.startswith("sequential")]
    result = {
        "device": args.device, "d_model": args.d_model, "layers": args.layers, "prompts": args.prompts,
        "max_new_tokens": args.tokens,
        "seconds": {name: round(statistics.median(t), 3) for name, t in times.items()},
        "speedup_vs_sequential": {name: round(base / statistics.median(t), 2) for name, t in times.items()},
        "batch_sizes_agree": all(o == batched_outputs[0] for o in batched_outputs),
        "greedy_matches_sequential": sum(a == b for a, b in zip(outputs["sequential generate()"], batched_outputs[0])),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
