"""`bastion quantize CKPT OUT --to int8|int4`: a full-precision checkpoint's model quantized
(weight-only, torchao; bastion/model/quantize.py) and saved as a normal verified Bastion
checkpoint: safetensors + manifest, no pickle. torchao's tensor subclasses are stored as their
plain inner tensors and a JSON description in trainer_state.json ("quantization"), so the
checkpoint loads back without re-quantizing (`load_for_inference`), bit for bit."""
from __future__ import annotations

from pathlib import Path

import torch

from bastion.checkpoint import Checkpoint, save_checkpoint
from bastion.checkpoint.checkpoint import resolve_checkpoint
from bastion.checkpoint.contents import (
    QUANTIZATION_KEY,
    checkpoint_tokenizer,
    load_full_model,
    manifest_sha256,
    tokenizer_state,
)
from bastion.checkpoint.formats import MODEL_FILE, SHARD_FILE
from bastion.checkpoint.safetensors_check import check_against_model
from bastion.errors import CheckpointError
from bastion.model import Transformer
from bastion.model.quantize import check_mode, flatten_quantized, quantize_model


def quantize_checkpoint(source: str | Path, out_dir: str | Path, mode: str) -> Path:
    """Quantize `source`'s model to `mode` and save it as step 0 under the new or empty
    folder `out_dir`; returns the checkpoint directory. The source must hold a whole
    full-precision language model (LoRA adapters are merged first with `bastion merge`)."""
    check_mode(mode, "--to")
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))):
        raise CheckpointError(f"output {out_dir} already exists and is not an empty folder; choose a new one")
    directory = resolve_checkpoint(source)
    sha = manifest_sha256(directory)
    ckpt, config = load_full_model(directory, what="checkpoint", reject_nonfinite=True)
    checkpoint_tokenizer(ckpt)  # its tokens must index the model: the copy is as usable as the source
    with torch.device("meta"):
        expected = Transformer(config.model).state_dict()
    check_against_model(ckpt.model, expected, directory / "model.safetensors", exact_dtype=False)
    model = Transformer.from_state_dict(config.model, ckpt.model).float().eval()
    quantize_model(model, mode)
    tensors, description = flatten_quantized(model.state_dict(), config.model)
    if manifest_sha256(directory) != sha:
        raise CheckpointError(f"{directory}: MANIFEST.json changed while it was being quantized")
    state = {**tokenizer_state(ckpt.trainer_state), "step": 0, QUANTIZATION_KEY: description,
             "quantized_from": {"path": str(directory.resolve()), "manifest_sha256": sha}}
    quantized = Checkpoint(model=tensors, trainer_state=state, config_yaml=ckpt.config_yaml,
                           tokenizer_json=ckpt.tokenizer_json)
    return save_checkpoint(out_dir, 0, quantized)


def weight_bytes(directory: Path) -> int:
    """Bytes of a checkpoint's model weights on disk (model.safetensors or its shards)."""
    return sum(f.stat().st_size for f in Path(directory).iterdir() if f.name == MODEL_FILE or SHARD_FILE.match(f.name))


__all__ = ["quantize_checkpoint", "weight_bytes"]
