"""`bastion generate` (registered in bastion/cli.py)."""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any, List, Optional

import typer

from bastion.checkpoint.cli import RequireSignatureOption, TrustedKeyOption, use_signature_options


class Quantization(str, Enum):
    """Weight-only quantization modes (bastion/model/quantize.py; docs/quantization.md)."""

    int8 = "int8"
    int4 = "int4"


_QUANTIZE_HELP = ("Quantize the transformer blocks' weights after loading (weight-only, torchao): int8 (a scale per "
                  "row) or int4 (a scale per 32 weights). Embedding and lm head stay float32. On CPU PyTorch's fused "
                  "int8 / int4 kernels run them: one stream decodes ~1.5x (int8) / ~2-2.8x (int4) faster than full "
                  "precision (docs/quantization.md: sizes, speed, perplexity). A checkpoint saved by `bastion "
                  "quantize` needs no flag.")
QuantizeOption = typer.Option(None, "--quantize", help=_QUANTIZE_HELP)


def quantize_value(option: Optional[Quantization]) -> Optional[str]:
    return option.value if option is not None else None


class InferenceDType(str, Enum):
    """Precision of the weights (those not quantized), KV cache and compute."""

    float32 = "float32"
    bfloat16 = "bfloat16"


DTypeOption = typer.Option(None, "--dtype", help="float32 (default) or bfloat16: half the memory; on CPUs with bf16 "
                           "matrix units (AMX) batched decoding is several times faster, a single stream about the "
                           "same (docs/serving.md). Not with --quantize.")


def generate_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Checkpoint folder, or a run/checkpoints folder (uses 'latest')."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens to generate (default generate.max_new_tokens; above the ceiling is an error)."),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy; higher = more random."),
    top_k: Optional[int] = typer.Option(None, help="Sample only among the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling: smallest set with this total probability."),
    seed: Optional[int] = typer.Option(None, help="Random seed for reproducible sampling."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop when this string appears (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Send the prompt as a user message through the model's chat "
                              "template and stop at its end of turn (fine-tuned / imported chat models)."),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="A JSON schema file (at most 64 KiB, 64 "
                                               "levels deep): the completion is decoded under it, so it is JSON that "
                                               "validates (unless cut by --max-new-tokens). Use with --chat to ask an "
                                               "instruction-tuned model; docs/serving.md#structured-output-and-tool-calls."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the SHA-256 manifest check (not recommended)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quantize: Optional[Quantization] = QuantizeOption,
    dtype: Optional[InferenceDType] = DTypeOption,
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Continue a prompt (or answer it, with --chat) with a trained checkpoint (verified before loading)."""
    from bastion.infer import generate
    from bastion.infer.loading import load_for_inference

    use_signature_options(require_signature, trusted_keys)
    loaded = load_for_inference(checkpoint, verify=not no_verify, quantize=quantize_value(quantize),
                                dtype=dtype.value if dtype is not None else "float32")
    model_input, stop_ids = prompt, None
    if chat:
        model_input = loaded.chat.encode_prompt([{"role": "user", "content": prompt}])
        stop_ids = loaded.chat.stop_ids
    grammar = None
    if json_schema is not None:
        grammar = schema_grammar(json_schema, loaded, stop_ids or [loaded.tokenizer.eos_id])
    result = generate(
        loaded.model, loaded.tokenizer, model_input, limits=loaded.config.generate,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
        stop_ids=stop_ids, grammar=grammar,
    )
    if as_json:
        print(json.dumps({"prompt": prompt, "completion": result.text, "finish_reason": result.finish_reason,
                          "prompt_tokens": result.prompt_tokens, "completion_tokens": len(result.token_ids)}))
    else:
        sys.stdout.write((result.text if chat else prompt + result.text) + "\n")


def schema_grammar(path: Path, loaded: Any, end_ids: list[int]) -> str:
    """--json-schema: the file read with its size and nesting bounded, then compiled for the model."""
    from bastion.errors import GenerationLimitError
    from bastion.infer.structured import MAX_SCHEMA_BYTES, check_schema, compile_grammar, json_grammar
    from bastion.safeio import read_json_limited

    schema = read_json_limited(path, MAX_SCHEMA_BYTES, GenerationLimitError, "JSON schema")
    text = check_schema(schema, where=f"JSON schema {path}")
    return compile_grammar(json_grammar(text), loaded.tokenizer, loaded.config.model.vocab_size or 0, end_ids)


def quantize_cmd(
    checkpoint: Path = typer.Argument(..., help="Full-precision checkpoint folder, or a run/checkpoints folder "
                                      "(uses 'latest'); verified before loading."),
    out_dir: Path = typer.Argument(..., help="New or empty folder for the quantized checkpoint (step_00000000)."),
    to: Quantization = typer.Option(..., "--to", help="int8: a float32 scale per output row. int4: a float32 scale "
                                    "per 32 weights, values packed two per byte on disk."),
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Save a weight-only quantized copy of a checkpoint (torchao int8 / int4) as a verified checkpoint:
    safetensors + manifest, no pickle. generate / eval / serve load it without re-quantizing; training,
    merging and export refuse it (use its full-precision source)."""
    from bastion.checkpoint.checkpoint import resolve_checkpoint
    from bastion.infer.quantize import quantize_checkpoint, weight_bytes

    use_signature_options(require_signature, trusted_keys)
    source = resolve_checkpoint(checkpoint)
    path = quantize_checkpoint(source, out_dir, to.value)
    size, before = weight_bytes(path), weight_bytes(source)
    sys.stdout.write(f"quantized {source} -> {path} ({to.value}; weights {size:,} bytes, {size / before:.0%} of "
                     f"the source's {before:,})\n")
