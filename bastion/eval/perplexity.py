"""`bastion eval perplexity`: a checkpoint's perplexity on held-out text, in full precision
and in each quantized format side by side, so a user sees what a format gives up.

Data: a plain text file (tokenized with the checkpoint's tokenizer) or a split of prepared
token shards (`bastion data prepare`; their vocabulary must be the model's). The first
`max_tokens` tokens are cut into non-overlapping windows of `seq_len` + 1 tokens (each
window predicts its last `seq_len` tokens from the ones before; a shorter last window is
kept), and every format sees exactly the same windows.

Formats, each built from the same full-precision weights:

    fp32       the checkpoint as `bastion generate` runs it
    bf16       every weight cast to bfloat16 (what training with bf16 weights would serve)
    int8/int4  Bastion's weight-only quantization (`--quantize`, `bastion quantize`),
               computed as inference computes it (on CPU: the fused kernels)
    gguf-f16 / gguf-q8_0 / gguf-q4_0
               the weight values a `bastion export gguf --dtype ...` file stores (gguf's own
               quantizer and dequantizer); llama.cpp's arithmetic on top of them (8-bit
               activations in its quantized dot products) is not reproduced

A quantized checkpoint (`bastion quantize`) can only be measured in its own format: its
full-precision weights are not in it (its trainer_state names the checkpoint they are in).
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from bastion.errors import ConfigError, DataError
from bastion.safeio import read_text_limited
from bastion.safepath import Roots

if TYPE_CHECKING:  # the CLI imports FORMATS without the model stack
    from bastion.infer.loading import LoadedModel

FORMATS = ("fp32", "bf16", "int8", "int4", "gguf-f16", "gguf-q8_0", "gguf-q4_0")
DEFAULT_FORMATS = ("fp32", "bf16", "int8", "int4", "gguf-q8_0", "gguf-q4_0")
MAX_TEXT_BYTES = 256 * 2**20
MAX_TOKENS_CEILING = 100_000_000


def check_formats(formats: Sequence[str]) -> list[str]:
    """The formats asked for, each known and named once; ConfigError naming the valid ones."""
    chosen = [str(f).strip() for f in formats]
    for name in chosen:
        if name not in FORMATS:
            raise ConfigError(f"--formats: unknown format {name[:40]!r}; choose from {', '.join(FORMATS)}")
    if not chosen:
        raise ConfigError(f"--formats: name at least one of {', '.join(FORMATS)}")
    if len(set(chosen)) != len(chosen):
        raise ConfigError("--formats: a format is named twice")
    return chosen


def read_tokens(loaded: "LoadedModel", *, text: str | Path | None, data: str | Path | None, split: str,
                roots: Sequence[str], max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` evaluation tokens as a 1-D int64 tensor, from exactly one of a
    text file or a token-shard folder (both confined to `roots`)."""
    if (text is None) == (data is None):
        raise ConfigError("give exactly one of --text (a text file) or --data (a prepared token-shard folder)")
    if not 2 <= max_tokens <= MAX_TOKENS_CEILING:
        raise ConfigError(f"--max-tokens must be between 2 and {MAX_TOKENS_CEILING:,}, not {max_tokens}")
    vocab = loaded.config.model.vocab_size
    if text is not None:
        path = Roots(roots).confine(text, "--text", must_exist=True)
        content = read_text_limited(path, MAX_TEXT_BYTES, DataError, "--text")
        ids = _encode_until(loaded.tokenizer, content, max_tokens)
        where = str(path)
    else:
        from bastion.data.shards import TokenShards

        folder = Roots(roots).confine(data, "--data", must_exist=True)
        shards = TokenShards(folder, split=split, verify=True)
        if shards.vocab_size != vocab:
            raise DataError(f"{folder}: the shards' vocabulary has {shards.vocab_size} tokens, the model's {vocab}; "
                            "prepare the data with the checkpoint's tokenizer")
        _same_tokenizer(folder, loaded.tokenizer.to_json_str())
        ids = shards.read(0, min(len(shards), max_tokens))
        where = f"{folder} (split {split})"
    tokens = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    if tokens.numel() < 2:
        raise DataError(f"{where}: {tokens.numel()} token(s); perplexity needs at least 2")
    if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
        raise DataError(f"{where}: token ids outside the model's vocabulary [0, {vocab})")
    return tokens


def _same_tokenizer(folder: Path, checkpoint_json: str) -> None:
    """DataError unless the dataset's tokenizer.json (verified against its index) has the
    checkpoint tokenizer's vocabulary and merges: ids of another tokenizer would be scored
    as if they were the model's tokens."""
    from bastion.data.shards import read_tokenizer_json
    from bastion.safeio import parse_json

    theirs = parse_json(read_tokenizer_json(folder), DataError, f"{folder}/tokenizer.json")
    ours = parse_json(checkpoint_json, DataError, "the checkpoint's tokenizer.json")
    if not isinstance(theirs, dict) or theirs.get("model") != ours.get("model"):
        raise DataError(f"{folder}: tokenized with another tokenizer than the checkpoint's (vocabulary or merges "
                        "differ); prepare the data with the checkpoint's tokenizer")


def _encode_until(tokenizer: Any, content: str, max_tokens: int, piece_chars: int = 1 << 20) -> list[int]:
    """The first `max_tokens` ids of `content`, encoding ~1 MB pieces cut after a newline
    until enough are read (a large file is not tokenized whole for a short evaluation)."""
    ids: list[int] = []
    start = 0
    while start < len(content) and len(ids) < max_tokens:
        end = content.find("\n", start + piece_chars)
        end = len(content) if end < 0 else end + 1
        ids.extend(tokenizer.encode(content[start:end]))
        start = end
    return ids[:max_tokens]


def windows(tokens: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Non-overlapping windows of seq_len + 1 tokens (neighbours share one token: the last
    input of one is the first of the next); the last may be shorter (>= 2 tokens)."""
    return [tokens[start:start + seq_len + 1] for start in range(0, tokens.numel() - 1, seq_len)]


@torch.inference_mode()
def mean_nll(model: torch.nn.Module, chunks: list[torch.Tensor], batch_size: int, device: torch.device) -> tuple[float, int]:
    """(mean next-token negative log-likelihood in nats, tokens predicted) over the windows;
    the loss is summed in float32 whatever the model's dtype."""
    total, count = 0.0, 0
    for size in sorted({c.numel() for c in chunks}, reverse=True):  # same-length windows batch together
        same = [c for c in chunks if c.numel() == size]
        for i in range(0, len(same), batch_size):
            batch = torch.stack(same[i:i + batch_size]).to(device)
            logits = model(batch[:, :-1])[0].float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += batch[:, 1:].numel()
    return total / count, count


def format_model(full: torch.nn.Module, name: str, device: torch.device) -> torch.nn.Module:
    """A copy of the full-precision `full` in format `name` (see the module docstring)."""
    if name == "fp32":
        return full
    model = copy.deepcopy(full)
    if name == "bf16":
        return model.to(torch.bfloat16)
    if name in ("int8", "int4"):
        from bastion.model.quantize import quantize_model, use_cpu_kernels

        quantize_model(model, name)
        if device.type == "cpu":
            use_cpu_kernels(model)
        return model
    from bastion.interop.gguf import stored_values

    state = stored_values(model.state_dict(), model.cfg, name.removeprefix("gguf-"))
    model.load_state_dict(state)
    return model


def eval_perplexity(checkpoint: str | Path, *, text: str | Path | None = None, data: str | Path | None = None,
                    split: str = "val", formats: Sequence[str] = DEFAULT_FORMATS, roots: Sequence[str] = (".",),
                    seq_len: int | None = None, max_tokens: int = 65_536, batch_size: int = 8,
                    device: str = "cpu") -> dict[str, Any]:
    """Perplexity of `checkpoint` on the same held-out tokens in each of `formats`; the first
    format is the baseline the others' changes are given against."""
    from bastion.infer.loading import load_for_inference

    chosen = check_formats(formats)
    loaded = load_for_inference(checkpoint, device=device)
    stored = loaded.quantization
    if stored is not None and chosen != [stored]:
        raise ConfigError(f"{loaded.directory} is a {stored}-quantized checkpoint: it can only be measured as "
                          f"--formats {stored} (its full-precision source is named in its trainer_state.json "
                          "'quantized_from')")
    length = min(seq_len or loaded.config.model.max_seq_len, loaded.config.model.max_seq_len)
    if length < 1:
        raise ConfigError("--seq-len must be at least 1")
    tokens = read_tokens(loaded, text=text, data=data, split=split, roots=roots, max_tokens=max_tokens)
    chunks = windows(tokens, length)
    dev = torch.device(device)
    rows: dict[str, dict[str, float]] = {}
    for name in chosen:
        model = loaded.model if stored is not None else format_model(loaded.model, name, dev)
        start = time.perf_counter()
        nll, count = mean_nll(model, chunks, batch_size, dev)
        rows[name] = {"nll": nll, "perplexity": math.exp(nll), "tokens": count,
                      "seconds": time.perf_counter() - start}
        del model
    base = rows[chosen[0]]
    for row in rows.values():
        row["change_pct"] = 100.0 * (row["perplexity"] / base["perplexity"] - 1.0)
    return {"checkpoint": str(loaded.directory), "baseline": chosen[0], "seq_len": length,
            "tokens": base["tokens"], "formats": rows}


__all__ = ["DEFAULT_FORMATS", "FORMATS", "check_formats", "eval_perplexity", "format_model", "mean_nll",
           "read_tokens", "windows"]
