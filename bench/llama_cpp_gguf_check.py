"""llama.cpp runs Bastion's GGUF exports: f16, q8_0 and q4_0 of one model, greedy decoding.

This half (Python) builds a random Llama-style model (8 layers, d_model 512, 4k BPE vocabulary
trained on the Python standard library's source: 27.8M parameters) or takes a trained
checkpoint (--checkpoint, with --prompts: a JSONL of {"prompt": text}, rendered as one user
turn when the checkpoint has a chat format), exports it three times with `export_gguf`, and
writes check.json: the files, their sizes, the prompts' token ids and Bastion's own greedy
continuation of each. The other half,
bench/llama_cpp_gguf_check.mjs, loads each file in llama.cpp (npm node-llama-cpp, prebuilt
CPU binaries), greedy-decodes the same ids and compares. Not part of `make test`:

    mkdir -p /tmp/llamacheck && (cd /tmp/llamacheck && npm i -E node-llama-cpp@3.21.1)
    OMP_NUM_THREADS=1 .venv/bin/python bench/llama_cpp_gguf_check.py /tmp/llamacheck/work
    # or: ... bench/llama_cpp_gguf_check.py /tmp/llamacheck/work --checkpoint RUN --prompts prompts.jsonl
    NODE_PATH=/tmp/llamacheck/node_modules node bench/llama_cpp_gguf_check.mjs /tmp/llamacheck/work/check.json

A random model's next-token distribution is flat, so its greedy tokens flip at small logit
changes: token agreement here is a pessimistic measure of what quantization does to a
trained model.
"""
from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path

PROMPTS = ["def main():\n    ", "import os\nimport sys\n\n", "class Parser:\n    def __init__(self, text):\n",
           "    for i in range(len(items)):\n        if ", "# Copyright 2001 Python Software Foundation\n",
           "    return self._data["]


def stdlib_text(limit: int = 2_000_000) -> list[str]:
    """Real text that is on every machine: the standard library's own source."""
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total > limit:
            break
    return texts


def build(work: Path, args: argparse.Namespace):
    import torch

    from bastion.checkpoint import Checkpoint, save_checkpoint
    from bastion.config import build_config
    from bastion.config.load import to_yaml
    from bastion.model import Transformer
    from bastion.tokenizer import BastionTokenizer

    tok = BastionTokenizer.train(stdlib_text(), vocab_size=args.vocab)
    cfg = build_config({"model": {"vocab_size": tok.vocab_size, "d_model": args.d_model, "n_layer": args.layers,
                                  "n_head": 8, "n_kv_head": 4, "max_seq_len": 512, "tie_embeddings": False},
                        "train": {"seq_len": 128}})
    torch.manual_seed(0)
    net = Transformer(cfg.model).eval()
    ckpt = Checkpoint(model=net.state_dict(), trainer_state={"step": 0}, config_yaml=to_yaml(cfg),
                      tokenizer_json=tok.to_json_str())
    return save_checkpoint(work / "model", 0, ckpt), net, tok


def greedy(net, ids: list[int], n: int, eos: int | None) -> list[int]:
    """Up to n argmax tokens; ends after `eos` (llama.cpp stops there too)."""
    import torch

    cache = net.new_cache(1)
    with torch.no_grad():
        logits, _ = net(torch.tensor([ids]), cache=cache, start_pos=0)
        out = []
        for _ in range(n):
            out.append(int(logits[0, -1].argmax()))
            if out[-1] == eos:
                break
            logits, _ = net(torch.tensor([[out[-1]]]), cache=cache, start_pos=len(ids) + len(out) - 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path, help="folder for the checkpoint, the .gguf files and check.json")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt")
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint instead of the random model")
    parser.add_argument("--prompts", type=Path, help='JSONL of {"prompt": text}')
    parser.add_argument("--n-prompts", type=int, default=6, help="how many of --prompts to use")
    args = parser.parse_args()

    from bastion.interop.gguf import export_gguf

    args.work.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is None:
        ckpt, net, tok = build(args.work, args)
        encode, eos = tok.encode, tok.eos_id
    else:
        from bastion.infer.loading import load_for_inference

        ckpt, loaded = args.checkpoint, load_for_inference(args.checkpoint)
        net, chat, eos = loaded.model.eval(), loaded.chat, loaded.tokenizer.eos_id
        encode = loaded.tokenizer.encode if chat is None else \
            (lambda text: chat.encode_prompt([{"role": "user", "content": text}]))
    texts = PROMPTS if args.prompts is None else \
        [json.loads(line)["prompt"] for line in args.prompts.read_text().splitlines()[:args.n_prompts]]
    files = {dtype: str(export_gguf(ckpt, args.work / f"model-{dtype}.gguf", dtype=dtype, overwrite=True))
             for dtype in ("f16", "q8_0", "q4_0")}
    prompts = [{"text": p, "ids": encode(p)} for p in texts]
    for p in prompts:
        p["bastion"] = greedy(net, p["ids"], args.tokens, eos)
    sizes = {dtype: Path(f).stat().st_size for dtype, f in files.items()}
    params = sum(p.numel() for p in net.parameters())
    check = {"params": params, "files": files, "sizes": sizes, "tokens": args.tokens, "eos": eos, "prompts": prompts}
    (args.work / "check.json").write_text(json.dumps(check, indent=1))
    print(f"{params / 1e6:.1f}M parameters; sizes: " +
          ", ".join(f"{d} {s / 2**20:.1f} MiB ({s / sizes['f16']:.0%} of f16)" for d, s in sizes.items()))


if __name__ == "__main__":
    main()
