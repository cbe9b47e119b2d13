"""LoRA adapter folders: a model's adapters saved apart from its base, verified like checkpoints.

    adapter.safetensors    the lora_A / lora_B tensors (names as in bastion/model/lora.py),
                           and a classify / regress run's whole `score.weight` head
    adapter_config.json    rank, alpha, dropout, targets, and the SHA-256 of the base
                           checkpoint's MANIFEST.json, so an adapter is never applied to a
                           base it was not trained on; a scoring run's "score_head"
                           (score_labels, objective, finetune.sequence: the label names)
    MANIFEST.json          size + SHA-256 of both, verified by `read_adapter`

Written atomically (private temp folder + rename) like checkpoints; `bastion export peft`
turns one into a PEFT folder, `bastion merge` folds one into its base.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from torch import nn

import bastion
from bastion import safeio
from bastion.checkpoint.checkpoint import read_checkpoint_file
from bastion.checkpoint.manifest import (
    MANIFEST,
    build_manifest,
    manifest_bytes,
    manifest_sha256,
    read_manifest_bytes,
    verify_directory,
)
from bastion.checkpoint.safetensors_check import check_against_model, check_finite, parse_header
from bastion.checkpoint.signing import SIGNATURE, check_signature, sign_manifest
from bastion.config.schema import BastionConfig, LoraConfig, SequenceTaskConfig
from bastion.errors import CheckpointError
from bastion.model.heads import SCORE_HEAD
from bastion.model.lora import apply_lora, is_lora_name, lora_module_name, lora_settings, lora_state_dict

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "bastion-lora-adapter"
ADAPTER_FORMAT_VERSION = 1
MAX_ADAPTER_CONFIG_BYTES = 1 * 2**20
MAX_ADAPTER_BYTES = 64 * 2**30


SCORING_OBJECTIVES = ("classify", "regress")


@dataclass
class ScoreHead:
    """The score head a classify / regress run trains beside its adapters: K outputs and
    what names them (the objective and its finetune.sequence settings)."""

    score_labels: int
    objective: str
    sequence: SequenceTaskConfig

    def to_json(self) -> dict[str, Any]:
        return {"score_labels": self.score_labels, "objective": self.objective,
                "sequence": self.sequence.model_dump(mode="json")}


def score_head_of(cfg: BastionConfig) -> ScoreHead | None:
    """The score head of a run's config; None for a language model."""
    labels = cfg.model.score_labels
    return None if labels is None else ScoreHead(labels, cfg.train.objective, cfg.finetune.sequence)


@dataclass
class Adapter:
    """A verified adapter folder: its LoRA settings, tensors and the base it belongs to."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    base_manifest_sha256: str
    manifest_sha256: str
    directory: Path
    head: ScoreHead | None = None  # a scoring run's: tensors then hold score.weight too


def check_sha(value: Any, what: str) -> str:
    if not safeio.is_sha256(value):
        raise CheckpointError(f"{what} must be a SHA-256 hex digest (64 lowercase hex characters)")
    return value


def check_base(recorded: str, base_manifest_sha256: str, where: str | Path) -> None:
    """Refuse adapters trained on another base than the one whose manifest hash is given."""
    if recorded != base_manifest_sha256:
        raise CheckpointError(f"{where}: adapter was trained on base checkpoint with MANIFEST sha256 "
                              f"{recorded[:16]}..., not this one ({base_manifest_sha256[:16]}...); "
                              "refusing to apply it to a different base")


def load_lora_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], where: str | Path = "adapter") -> None:
    """Copy adapter tensors into a LoRA-wrapped model: the names must be exactly the model's
    adapter names, shapes equal, values finite floats. CheckpointError otherwise."""
    expected = lora_state_dict(model)
    if not expected:
        raise CheckpointError(f"{where}: the model has no LoRA modules to load adapters into (apply_lora first)")
    check_against_model(tensors, expected, where, exact_dtype=False)
    check_finite(tensors, where)
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])


def attach(model: nn.Module, cfg: LoraConfig, tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """Wrap the model as `cfg` says (or check an existing wrapping matches) and load tensors."""
    if lora_settings(model) is not None:
        _check_settings(model, cfg, f"{where}: the model's LoRA modules differ from the adapter's")
    else:
        apply_lora(model, cfg)
    load_lora_state_dict(model, tensors, where)


def _check_settings(model: nn.Module, cfg: LoraConfig, problem: str) -> None:
    targets, rank, alpha = lora_settings(model)
    if targets != set(cfg.target_modules) or rank != cfg.rank or alpha != float(cfg.alpha):
        raise CheckpointError(f"{problem}: model (targets {sorted(targets)}, rank {rank}, alpha {alpha}), "
                              f"config (targets {sorted(cfg.target_modules)}, rank {cfg.rank}, alpha {cfg.alpha})")


def _out_dir_ok(out_dir: Path, *, replaceable: bool) -> bool:
    """Whether `out_dir` is to be replaced (an existing adapter folder, with `replaceable`);
    CheckpointError when it is anything else that is not new or empty."""
    if out_dir.is_symlink():
        raise CheckpointError(f"{out_dir}: is a symbolic link; choose a real folder")
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a folder")
    if not any(out_dir.iterdir()):
        return False
    if replaceable and (out_dir / ADAPTER_CONFIG).is_file() and (out_dir / MANIFEST).is_file():
        return True
    raise CheckpointError(f"{out_dir} already exists and is not an empty folder; choose a new one")


def write_new_dir(out_dir: str | Path, files: dict[str, Any]) -> Path:
    """Write `files` as a new folder (out_dir must not exist, or be empty), atomically."""
    out_dir = Path(out_dir)
    _out_dir_ok(out_dir, replaceable=False)
    return safeio.write_dir_atomic(out_dir, files)


def save_adapter(model: nn.Module, cfg: LoraConfig, out_dir: str | Path, base_manifest_sha256: str, *,
                 tensors: dict[str, torch.Tensor] | None = None, signing_key: str | Path | None = None,
                 head: ScoreHead | None = None) -> Path:
    """Write the model's adapters to `out_dir` (adapter.safetensors, adapter_config.json,
    MANIFEST.json), atomically; an existing adapter folder there is replaced, anything else
    non-empty is refused. `cfg` must describe the model's adapters; `base_manifest_sha256` is
    the base checkpoint's `manifest_sha256`. `tensors`: the adapters already gathered (a
    sharded model's own are pieces), checked against the model's names and shapes. `head`: a
    scoring model's (its score.weight is among the tensors), recorded in adapter_config.json."""
    check_sha(base_manifest_sha256, "base_manifest_sha256")
    expected = lora_state_dict(model)
    if tensors is None:
        tensors = expected
    elif expected:
        check_against_model(tensors, expected, out_dir, exact_dtype=False)
    if not tensors:
        raise CheckpointError("the model has no LoRA adapters to save (apply_lora first)")
    _check_settings(model, cfg, "the LoRA config does not describe the model's adapters")
    _check_head_tensor(head, tensors, out_dir)
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "bastion_version": bastion.__version__,
        "rank": cfg.rank,
        "alpha": float(cfg.alpha),
        "dropout": float(cfg.dropout),
        "target_modules": list(dict.fromkeys(cfg.target_modules)),
        "base_manifest_sha256": base_manifest_sha256,
    }
    if head is not None:
        meta["score_head"] = head.to_json()
    files = {
        ADAPTER_FILE: safetensors.torch.save({k: v.to("cpu").contiguous() for k, v in tensors.items()}),
        ADAPTER_CONFIG: (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(),
    }
    files[MANIFEST] = manifest_bytes(build_manifest(files))
    out_dir = Path(out_dir)
    if signing_key is not None:
        files[SIGNATURE] = sign_manifest(files[MANIFEST], signing_key, out_dir.name)
    return safeio.write_dir_atomic(out_dir, files, replace=_out_dir_ok(out_dir, replaceable=True))


def _check_head_tensor(head: ScoreHead | None, tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """A score head's tensor is there exactly when a head is declared, with its K rows."""
    weight = tensors.get(SCORE_HEAD)
    if head is None and weight is not None:
        raise CheckpointError(f"{where}: holds {SCORE_HEAD} but adapter_config.json declares no score_head")
    if head is None:
        return
    if weight is None or weight.dim() != 2 or weight.shape[0] != head.score_labels:
        shape = None if weight is None else tuple(weight.shape)
        raise CheckpointError(f"{where}: score_head declares {head.score_labels} labels, but {SCORE_HEAD} is "
                              f"{'missing' if weight is None else f'of shape {shape}'}")


def _score_head(meta: dict[str, Any], where: Path) -> ScoreHead | None:
    raw = meta.get("score_head")
    if raw is None:
        return None
    if not isinstance(raw, dict) or raw.get("objective") not in SCORING_OBJECTIVES:
        raise CheckpointError(f"{where}: score_head must record objective classify or regress")
    labels = raw.get("score_labels")
    if type(labels) is not int or not 1 <= labels <= 1024:
        raise CheckpointError(f"{where}: score_head.score_labels must be an integer from 1 to 1024")
    try:
        sequence = SequenceTaskConfig.model_validate(raw.get("sequence"))
    except ValidationError as exc:
        raise CheckpointError(f"{where}: invalid score_head.sequence ({exc.errors()[0]['msg']})") from None
    return ScoreHead(labels, raw["objective"], sequence)


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """Read and verify an adapter folder: manifest (sizes, SHA-256, no extra files, no links),
    adapter_config.json, a strictly validated safetensors file of finite float tensors whose
    names are LoRA names. Each file is read once; the bytes hashed are the bytes parsed."""
    directory = Path(adapter_dir)
    if not directory.is_dir() or directory.is_symlink():
        raise CheckpointError(f"adapter folder not found (or not a real folder): {directory}")
    manifest, manifest_raw = read_manifest_bytes(directory)
    check_signature(directory, manifest_raw)
    verify_directory(directory, manifest, hash_files=False)  # no links, no extra files; hashes below
    listed = manifest["files"]
    if set(listed) != {ADAPTER_FILE, ADAPTER_CONFIG}:
        raise CheckpointError(f"{directory}: not a LoRA adapter folder (expected {ADAPTER_FILE} and {ADAPTER_CONFIG})")
    meta = safeio.parse_json(read_checkpoint_file(directory, ADAPTER_CONFIG, MAX_ADAPTER_CONFIG_BYTES),
                             CheckpointError, str(directory / ADAPTER_CONFIG))
    cfg, base_sha = _adapter_settings(meta, directory / ADAPTER_CONFIG)
    head = _score_head(meta, directory / ADAPTER_CONFIG)
    data = read_checkpoint_file(directory, ADAPTER_FILE, MAX_ADAPTER_BYTES)
    parse_header(data, directory / ADAPTER_FILE)
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{directory / ADAPTER_FILE}: not a valid safetensors file ({exc})") from None
    for name, tensor in tensors.items():
        module = lora_module_name(name)
        adapter_tensor = is_lora_name(name) and module is not None and module.rpartition(".")[2] in cfg.target_modules
        if not adapter_tensor and not (name == SCORE_HEAD and head is not None):
            raise CheckpointError(f"{directory / ADAPTER_FILE}: unexpected tensor {name[:120]!r}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{directory / ADAPTER_FILE}: tensor {name!r} is not floating point")
    if not tensors:
        raise CheckpointError(f"{directory / ADAPTER_FILE}: holds no adapter tensors")
    _check_head_tensor(head, tensors, directory / ADAPTER_FILE)
    check_finite(tensors, directory / ADAPTER_FILE)
    return Adapter(config=cfg, tensors=tensors, base_manifest_sha256=base_sha,
                   manifest_sha256=manifest_sha256(directory), directory=directory, head=head)


def _adapter_settings(meta: Any, where: Path) -> tuple[LoraConfig, str]:
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{where}: not a {ADAPTER_FORMAT} config")
    if meta.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise CheckpointError(f"{where}: format version {meta.get('format_version')!r} "
                              f"is not supported (expected {ADAPTER_FORMAT_VERSION})")
    base_sha = check_sha(meta.get("base_manifest_sha256"), f"{where}: base_manifest_sha256")
    try:
        cfg = LoraConfig(enabled=True, rank=meta.get("rank"), alpha=meta.get("alpha"), dropout=meta.get("dropout"),
                         target_modules=meta.get("target_modules"))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CheckpointError(f"{where}: invalid LoRA settings: {problems}") from None
    return cfg, base_sha


def load_adapter(model: nn.Module, adapter_dir: str | Path, base_manifest_sha256: str) -> LoraConfig:
    """Verify an adapter folder, refuse it unless it was trained on the base whose manifest
    hash is given, wrap the model (unless it already carries matching LoRA modules) and load
    the adapter. The model must hold that base's weights. Returns the adapter's LoraConfig."""
    check_sha(base_manifest_sha256, "base_manifest_sha256")
    adapter = read_adapter(adapter_dir)
    check_base(adapter.base_manifest_sha256, base_manifest_sha256, adapter.directory)
    attach(model, adapter.config, adapter.tensors, adapter.directory / ADAPTER_FILE)
    return adapter.config


__all__ = ["ADAPTER_CONFIG", "ADAPTER_FILE", "Adapter", "ScoreHead", "attach", "score_head_of", "check_base", "load_adapter",
           "load_lora_state_dict", "read_adapter", "save_adapter", "write_new_dir"]
