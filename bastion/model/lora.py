"""LoRA: low-rank adapters on the attention / MLP projections, saved apart from the base.

    y = base(x) + dropout(x) @ A^T @ B^T * (alpha / rank)       A: [rank, in], B: [out, rank]

A starts Kaiming-uniform and B at zero (as PEFT does), so a freshly wrapped model computes
exactly what the base did. `apply_lora` wraps the target projections of every layer and
freezes everything else (embeddings, norms, lm_head, the wrapped base weights).

State-dict names. A `LoRALinear` registers the base layer's own `weight` / `bias` Parameters
on itself (the same tensors, not copies) next to `lora_A` / `lora_B`, so a wrapped model's
keys are the base keys plus two per wrapped module:

    layers.0.attention.wq.weight    unchanged: base checkpoints load into a wrapped model
    layers.0.attention.wq.bias      (with qkv_bias)
    layers.0.attention.wq.lora_A    new, trainable
    layers.0.attention.wq.lora_B    new, trainable

No state-dict hooks are needed, and `merge_lora` puts the same Parameters back into a plain
nn.Linear, so the merged model's state dict is exactly a base state dict.

Adapters are saved on their own (`save_adapter`): a folder with adapter.safetensors,
adapter_config.json (rank, alpha, dropout, targets, and the SHA-256 of the base checkpoint's
MANIFEST.json, so an adapter is never applied to a base it was not trained on) and a
MANIFEST.json that `load_adapter` verifies, written atomically like checkpoints.
`merge_checkpoint` folds an adapter into its base and writes a normal Bastion checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError
from safetensors import SafetensorError
from torch import nn

import bastion
from bastion.checkpoint.checkpoint import (
    Checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from bastion.checkpoint.manifest import (
    MANIFEST,
    build_manifest,
    manifest_bytes,
    read_manifest,
    verify_directory,
)
from bastion.checkpoint.safetensors_check import check_against_model, check_finite, parse_header
from bastion.config.schema import BastionConfig, LoraConfig
from bastion.errors import CheckpointError, ConfigError
from bastion import safeio

# Short target name -> the sub-module of a layer that holds it.
TARGETS: dict[str, str] = {
    "wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
    "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward",
}
LORA_SUFFIXES = (".lora_A", ".lora_B")
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FORMAT = "bastion-lora-adapter"
ADAPTER_FORMAT_VERSION = 1
# trainer_state.json key under which a LoRA training run records its base checkpoint.
BASE_SHA_KEY = "lora_base_manifest_sha256"
MAX_ADAPTER_CONFIG_BYTES = 1 * 2**20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_MODULE = re.compile(r"^layers\.(\d+)\.(attention|feed_forward)\.(w[qkvo123])$")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Holds the base's `weight` and
    `bias` Parameters itself, so its state-dict keys for them are those of the nn.Linear
    it replaces."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, not {type(base).__name__}")
        if rank < 1 or not alpha > 0 or not 0.0 <= dropout < 1.0:
            raise ValueError("LoRA needs rank >= 1, alpha > 0 and 0 <= dropout < 1")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha = int(rank), float(alpha)
        self.scaling = self.alpha / self.rank
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what PEFT (and nn.Linear) use
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return F.linear(x, self.weight, self.bias) + update * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding weight + B @ A * scaling (computed in float32). The
        weight Parameter is updated in place and reused: do not call twice."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha:g}")


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{module name: LoRALinear} in model order (pass the raw model, not a DDP / compiled wrapper)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _check_targets(targets: list[str]) -> list[str]:
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ConfigError(f"finetune.lora.target_modules: unknown module(s) {unknown}; choose from wq wk wv wo w1 w2 w3",
                          [("finetune.lora.target_modules", f"unknown module(s) {unknown}")])
    if not targets:
        raise ConfigError("finetune.lora.target_modules is empty", [("finetune.lora.target_modules", "empty")])
    return list(dict.fromkeys(targets))


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Replace the `cfg.target_modules` projections of every layer with LoRALinear and freeze
    every other parameter. Returns the wrapped module names ("layers.0.attention.wq", ...).
    Call it after loading the base weights and before building the optimizer."""
    targets = _check_targets(list(cfg.target_modules))
    if lora_modules(model):
        raise ConfigError("the model already has LoRA adapters (apply_lora was called twice)")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        m = _MODULE.match(name)
        if m is None or m.group(3) not in targets or not isinstance(module, nn.Linear):
            continue
        parent = model.get_submodule(name.rpartition(".")[0])
        lora = LoRALinear(module, cfg.rank, cfg.alpha, cfg.dropout)
        lora.train(module.training)  # a model already in eval mode must not get training-mode dropout
        setattr(parent, m.group(3), lora)
        wrapped.append(name)
    if not wrapped:
        raise ConfigError(f"no module of the model matches LoRA targets {targets}")
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only: {"layers.N.attention.wq.lora_A": ..., ".lora_B": ...} (detached)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def is_lora_name(name: str) -> bool:
    return name.endswith(LORA_SUFFIXES)


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


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its base weight (W += B @ A * alpha / rank) and put plain
    nn.Linear modules back; returns the merged module names. The model's state dict is then
    a base state dict again. requires_grad flags are left as they were (all frozen after
    apply_lora)."""
    merged = []
    for name, m in lora_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, m.merged())
        merged.append(name)
    return merged


# ---- adapter folders ----------------------------------------------------------------------

def manifest_sha256(ckpt_path: str | Path) -> str:
    """SHA-256 of a checkpoint's MANIFEST.json: identifies the exact base an adapter was
    trained on (the manifest hashes every file, so it changes whenever any weight does).
    Accepts what `resolve_checkpoint` accepts."""
    path = resolve_checkpoint(ckpt_path) / MANIFEST
    if path.is_symlink() or not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_sha(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise CheckpointError(f"{what} must be a SHA-256 hex digest (64 lowercase hex characters)")
    return value


@dataclass
class Adapter:
    """A verified adapter folder: its LoRA settings, tensors and the base it belongs to."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    base_manifest_sha256: str
    manifest_sha256: str
    directory: Path


def _model_lora_config(model: nn.Module) -> tuple[set[str], int, float]:
    modules = lora_modules(model)
    ranks = {m.rank for m in modules.values()}
    alphas = {m.alpha for m in modules.values()}
    if len(ranks) != 1 or len(alphas) != 1:
        raise CheckpointError("the model's LoRA modules disagree on rank / alpha")
    return {_MODULE.match(n).group(3) for n in modules}, ranks.pop(), alphas.pop()


def write_dir_atomic(out_dir: Path, files: dict[str, bytes], *, replaceable: bool = False) -> Path:
    """Write `files` into a private temp folder beside out_dir, fsync, and rename it into
    place. out_dir must not exist or be empty - or, with `replaceable`, already be a Bastion
    adapter folder, which is then swapped out atomically."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise CheckpointError(f"{out_dir}: is a symbolic link; choose a real folder")
    replace = False
    if out_dir.exists():
        if not out_dir.is_dir():
            raise CheckpointError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()):
            if not (replaceable and (out_dir / ADAPTER_CONFIG).is_file() and (out_dir / MANIFEST).is_file()):
                raise CheckpointError(f"{out_dir} already exists and is not an empty folder; choose a new one")
            replace = True
    return safeio.write_dir_atomic(out_dir, files, replace=replace)


def save_adapter(model: nn.Module, cfg: LoraConfig, out_dir: str | Path, base_manifest_sha256: str, *,
                 tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's adapters to `out_dir` (adapter.safetensors, adapter_config.json,
    MANIFEST.json), atomically; an existing adapter folder there is replaced, anything else
    non-empty is refused. `cfg` must describe the model's adapters; `base_manifest_sha256` is
    `manifest_sha256(base checkpoint)`. `tensors`: the adapters already gathered (a sharded
    model's own are pieces), checked against the model's names and shapes."""
    _check_sha(base_manifest_sha256, "base_manifest_sha256")
    expected = lora_state_dict(model)
    if tensors is None:
        tensors = expected
    elif expected:
        check_against_model(tensors, expected, out_dir, exact_dtype=False)
    if not tensors:
        raise CheckpointError("the model has no LoRA adapters to save (apply_lora first)")
    targets, rank, alpha = _model_lora_config(model)
    if targets != set(cfg.target_modules) or rank != cfg.rank or alpha != float(cfg.alpha):
        raise CheckpointError(f"LoRA config (targets {sorted(cfg.target_modules)}, rank {cfg.rank}, alpha {cfg.alpha}) "
                              f"does not describe the model's adapters (targets {sorted(targets)}, rank {rank}, alpha {alpha})")
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
    files = {
        ADAPTER_FILE: safetensors.torch.save({k: v.to("cpu").contiguous() for k, v in tensors.items()}),
        ADAPTER_CONFIG: (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(),
    }
    files[MANIFEST] = manifest_bytes(build_manifest(files))
    return write_dir_atomic(Path(out_dir), files, replaceable=True)


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """Read and verify an adapter folder: manifest (sizes, SHA-256, no extra files, no links),
    adapter_config.json, a strictly validated safetensors file of finite float tensors whose
    names are LoRA names. Each file is read once; the bytes hashed are the bytes parsed."""
    directory = Path(adapter_dir)
    if not directory.is_dir() or directory.is_symlink():
        raise CheckpointError(f"adapter folder not found (or not a real folder): {directory}")
    manifest = read_manifest(directory)
    verify_directory(directory, manifest, hash_files=False)
    listed = manifest["files"]
    if set(listed) != {ADAPTER_FILE, ADAPTER_CONFIG}:
        raise CheckpointError(f"{directory}: not a LoRA adapter folder (expected {ADAPTER_FILE} and {ADAPTER_CONFIG})")

    def read(name: str) -> bytes:
        data = (directory / name).read_bytes()
        if hashlib.sha256(data).hexdigest() != listed[name]["sha256"]:
            raise CheckpointError(f"{directory / name}: SHA-256 does not match manifest (file modified or corrupt)")
        return data

    if listed[ADAPTER_CONFIG]["size"] > MAX_ADAPTER_CONFIG_BYTES:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: over {MAX_ADAPTER_CONFIG_BYTES} bytes")
    try:
        meta = json.loads(read(ADAPTER_CONFIG))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: invalid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: not a {ADAPTER_FORMAT} config")
    if meta.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: format version {meta.get('format_version')!r} "
                              f"is not supported (expected {ADAPTER_FORMAT_VERSION})")
    base_sha = _check_sha(meta.get("base_manifest_sha256"), f"{directory / ADAPTER_CONFIG}: base_manifest_sha256")
    try:
        cfg = LoraConfig(enabled=True, rank=meta.get("rank"), alpha=meta.get("alpha"), dropout=meta.get("dropout"),
                         target_modules=meta.get("target_modules"))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise CheckpointError(f"{directory / ADAPTER_CONFIG}: invalid LoRA settings: {problems}") from None

    data = read(ADAPTER_FILE)
    parse_header(data, directory / ADAPTER_FILE)
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{directory / ADAPTER_FILE}: not a valid safetensors file ({exc})") from None
    for name, tensor in tensors.items():
        m = _MODULE.match(name.rpartition(".")[0])
        if not is_lora_name(name) or m is None or m.group(3) not in cfg.target_modules:
            raise CheckpointError(f"{directory / ADAPTER_FILE}: unexpected tensor {name[:120]!r}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{directory / ADAPTER_FILE}: tensor {name!r} is not floating point")
    if not tensors:
        raise CheckpointError(f"{directory / ADAPTER_FILE}: holds no adapter tensors")
    check_finite(tensors, directory / ADAPTER_FILE)
    own_sha = hashlib.sha256((directory / MANIFEST).read_bytes()).hexdigest()
    return Adapter(config=cfg, tensors=tensors, base_manifest_sha256=base_sha, manifest_sha256=own_sha,
                   directory=directory)


def _check_base(recorded: str, base_manifest_sha256: str, where: str | Path) -> None:
    if recorded != base_manifest_sha256:
        raise CheckpointError(f"{where}: adapter was trained on base checkpoint with MANIFEST sha256 "
                              f"{recorded[:16]}..., not this one ({base_manifest_sha256[:16]}...); "
                              "refusing to apply it to a different base")


def _attach(model: nn.Module, cfg: LoraConfig, tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """Wrap the model as `cfg` says (or check an existing wrapping matches) and load tensors."""
    if lora_modules(model):
        targets, rank, alpha = _model_lora_config(model)
        if targets != set(cfg.target_modules) or rank != cfg.rank or alpha != float(cfg.alpha):
            raise CheckpointError(f"{where}: the model's LoRA modules (targets {sorted(targets)}, rank {rank}, "
                                  f"alpha {alpha}) differ from the adapter's ({sorted(cfg.target_modules)}, "
                                  f"rank {cfg.rank}, alpha {cfg.alpha})")
    else:
        apply_lora(model, cfg)
    load_lora_state_dict(model, tensors, where)


def load_adapter(model: nn.Module, adapter_dir: str | Path, base_manifest_sha256: str) -> LoraConfig:
    """Verify an adapter folder, refuse it unless it was trained on the base whose manifest
    hash is given, wrap the model (unless it already carries matching LoRA modules) and load
    the adapter. The model must hold that base's weights. Returns the adapter's LoraConfig."""
    _check_sha(base_manifest_sha256, "base_manifest_sha256")
    adapter = read_adapter(adapter_dir)
    _check_base(adapter.base_manifest_sha256, base_manifest_sha256, adapter.directory)
    _attach(model, adapter.config, adapter.tensors, adapter.directory / ADAPTER_FILE)
    return adapter.config


# ---- merging into a checkpoint ------------------------------------------------------------

def _checkpoint_config(ckpt: Checkpoint) -> BastionConfig:
    from bastion.config.load import build_config

    try:
        raw = yaml.safe_load(ckpt.config_yaml) or {}
    except yaml.YAMLError:
        raise CheckpointError(f"{ckpt.directory}/config.yaml: invalid YAML") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{ckpt.directory}/config.yaml: not a mapping")
    return build_config(raw, source=f"{ckpt.directory}/config.yaml")


def _attach_from_training_checkpoint(model: nn.Module, path: Path, base_sha: str,
                                     base_state: dict[str, torch.Tensor]) -> str:
    """Adapters from a LoRA training checkpoint: its model tensors are the LoRA ones, plus
    optionally the (frozen) base weights, which must then equal the base's. The run must have
    recorded its base (trainer_state[BASE_SHA_KEY]), unless those full base weights prove it."""
    directory = resolve_checkpoint(path)
    own_sha = manifest_sha256(directory)
    ckpt = load_checkpoint(directory, load_optimizer=False)
    lora_cfg = _checkpoint_config(ckpt).finetune.lora
    if not lora_cfg.enabled:
        raise CheckpointError(f"{directory}: not a LoRA run (finetune.lora.enabled is false in its config.yaml)")
    tensors = {k: v for k, v in ckpt.model.items() if is_lora_name(k)}
    others = {k: v for k, v in ckpt.model.items() if not is_lora_name(k)}
    recorded = ckpt.trainer_state.get(BASE_SHA_KEY)
    if recorded is not None:
        _check_base(_check_sha(recorded, f"{directory}/trainer_state.json: {BASE_SHA_KEY}"), base_sha, directory)
    elif not others:
        raise CheckpointError(f"{directory}: does not record which base checkpoint it was trained on "
                              f"(trainer_state {BASE_SHA_KEY}); refusing to merge it")
    if others:
        same = set(others) == set(base_state) and all(
            others[k].shape == base_state[k].shape and torch.equal(others[k].to(base_state[k].dtype), base_state[k])
            for k in others)
        if not same:
            raise CheckpointError(f"{directory}: its base weights differ from the base checkpoint's "
                                  "(a different base, or base weights that were not frozen)")
    _attach(model, lora_cfg, tensors, directory)
    return own_sha


def merge_checkpoint(base_ckpt: str | Path, adapter: str | Path, out_dir: str | Path) -> Path:
    """Fold an adapter into its base and write a normal Bastion checkpoint (step 0) under
    out_dir: merged weights in the base's dtypes, the base's config.yaml with LoRA disabled,
    its tokenizer, chat template and special tokens. `adapter` is an adapter folder
    (`save_adapter`) or a LoRA training checkpoint / run dir. Refuses an adapter trained on
    another base and a non-empty out_dir. Returns the checkpoint directory."""
    from bastion.config.load import to_yaml
    from bastion.model.transformer import Transformer

    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))):
        raise CheckpointError(f"output {out_dir} already exists and is not an empty folder; choose a new one")
    base_dir = resolve_checkpoint(base_ckpt)
    base_sha = manifest_sha256(base_dir)
    base = load_checkpoint(base_dir, load_optimizer=False)
    config = _checkpoint_config(base)
    if config.model.vocab_size is None:
        raise CheckpointError(f"{base_dir}/config.yaml: model.vocab_size is not set")
    try:
        # Assigned, not copied (one copy of the weights in memory); the merge is done in float32.
        model = Transformer.from_state_dict(config.model, base.model)
    except RuntimeError as exc:
        raise CheckpointError(f"{base_dir}: weights do not match its config.yaml ({str(exc)[:300]})") from None
    if manifest_sha256(base_dir) != base_sha:
        raise CheckpointError(f"{base_dir}: MANIFEST.json changed while merging")

    adapter_path = Path(adapter)
    if (adapter_path / ADAPTER_CONFIG).exists():
        loaded = read_adapter(adapter_path)
        _check_base(loaded.base_manifest_sha256, base_sha, loaded.directory)
        _attach(model, loaded.config, loaded.tensors, loaded.directory / ADAPTER_FILE)
        adapter_sha = loaded.manifest_sha256
    else:
        adapter_sha = _attach_from_training_checkpoint(model, adapter_path, base_sha, base.model)
    merge_lora(model)

    state = {k: v.detach().to(base.model[k].dtype) for k, v in model.state_dict().items()}
    config.finetune.lora.enabled = False
    trainer_state: dict[str, Any] = {k: base.trainer_state[k] for k in ("chat_template", "special_tokens", "imported_from")
                                     if k in base.trainer_state}
    trainer_state.update(step=0, merged_lora={"base_manifest_sha256": base_sha, "adapter_manifest_sha256": adapter_sha})
    merged = Checkpoint(model=state, trainer_state=trainer_state, config_yaml=to_yaml(config),
                        tokenizer_json=base.tokenizer_json)
    return save_checkpoint(out_dir, 0, merged)


__all__ = ["ADAPTER_CONFIG", "ADAPTER_FILE", "BASE_SHA_KEY", "Adapter", "LoRALinear", "apply_lora", "is_lora_name",
           "load_adapter", "load_lora_state_dict", "lora_modules", "lora_state_dict", "manifest_sha256", "merge_checkpoint",
           "merge_lora", "read_adapter", "save_adapter"]
