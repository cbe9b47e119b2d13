"""Adapters for `bastion serve`: verify adapter folders against the served base and install
them on its model (bastion/model/multi_lora.py), each served under its own model name.

Every check happens at startup, before the server listens; any failure stops it:

  * names: a safe charset (ADAPTER_NAME), distinct, not the base's name, at most
    serve.max_adapters of them;
  * paths: confined to data.allowed_roots like the config's other input paths;
  * folders: verified as `read_adapter` verifies them (manifest sizes and SHA-256, no extra
    files or links, signature when required, finite float tensors with LoRA names);
  * base: the SHA-256 of the served checkpoint's MANIFEST.json must be the one the adapter
    recorded (`base_manifest_sha256`), so an adapter is never served on another base;
  * fit: its tensors must be exactly lora_A [rank, in] / lora_B [out, rank] for its targets
    in every layer of the base.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from bastion.adapters.folder import ADAPTER_FILE, Adapter, read_adapter
from bastion.config.schema import ADAPTER_NAME_PATTERN
from bastion.errors import CheckpointError, ConfigError
from bastion.model.multi_lora import AdapterSet, ServedAdapter, expected_shapes, install_adapters
from bastion.safepath import Roots

# The model names clients send: no spaces, slashes or quotes (they appear in logs and
# metric labels), never a path. The config schema checks serve.adapters with it too.
ADAPTER_NAME = re.compile(ADAPTER_NAME_PATTERN)


def check_adapter_names(names: list[str], base_name: str | None, max_adapters: int, where: str) -> None:
    """Refuse a bad name, a name used twice or the base's, and more than `max_adapters`."""
    if len(names) > max_adapters:
        raise ConfigError(f"{where}: {len(names)} adapters, over serve.max_adapters ({max_adapters})")
    for name in names:
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise ConfigError(f"{where}: adapter name {str(name)[:80]!r} is not allowed: use 1-64 letters, digits, "
                              "'.', '_' or '-', starting with a letter or digit")
        if name == base_name:
            raise ConfigError(f"{where}: adapter name {name!r} is the base model's name; choose another")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: an adapter name is given twice")


def merge_adapter_specs(configured: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """The config's serve.adapters plus the command line's --adapter ones; a name in both is
    refused rather than one silently replacing the other."""
    both = sorted(set(configured) & set(extra))
    if both:
        raise ConfigError(f"--adapter {both[0]}: already set in serve.adapters; give each name once")
    return {**configured, **extra}


def parse_adapter_option(value: str) -> tuple[str, str]:
    """`--adapter name=path` -> (name, path)."""
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--adapter {value[:120]!r}: expected NAME=PATH (an adapter folder)")
    return name, path


def load_served_adapters(model: nn.Module, specs: Mapping[str, str], base_manifest_sha256: str,
                         roots: Roots) -> AdapterSet:
    """Verify every adapter folder of `specs` ({name: path}) for the base `model` (loaded
    from the checkpoint whose MANIFEST.json hashes to `base_manifest_sha256`) and install
    them all; CheckpointError / DataError naming the adapter otherwise. Nothing is installed
    unless every adapter passes."""
    served = []
    for name, path in specs.items():
        directory = roots.confine(path, f"serve.adapters.{name}", must_exist=True)
        adapter = read_adapter(directory)
        _check_base(name, adapter, base_manifest_sha256)
        _check_fit(name, adapter, model)
        served.append(ServedAdapter(name, adapter.config, adapter.tensors))
    return install_adapters(model, served)


def _check_base(name: str, adapter: Adapter, base_sha: str) -> None:
    if adapter.base_manifest_sha256 != base_sha:
        raise CheckpointError(f"adapter {name!r} ({adapter.directory}) was trained on the base checkpoint whose "
                              f"MANIFEST.json has SHA-256 {adapter.base_manifest_sha256}, but the served base's is "
                              f"{base_sha}; refusing to serve it on a different base")


def _check_fit(name: str, adapter: Adapter, model: nn.Module) -> None:
    """The adapter's tensors are exactly those its rank and targets need on this base."""
    where = f"adapter {name!r} ({adapter.directory / ADAPTER_FILE})"
    if adapter.head is not None:  # a classifier's head replaces the lm head: nothing to generate with
        raise CheckpointError(f"{where}: is a train.objective {adapter.head.objective} adapter (it carries a score "
                              "head); serving generates text; use `bastion predict --checkpoint RUN_DIR` instead")
    cfg = adapter.config
    expected = expected_shapes(model, cfg)
    missing = sorted(set(expected) - set(adapter.tensors))
    extra = sorted(set(adapter.tensors) - set(expected))
    if extra:
        raise CheckpointError(f"{where}: {extra[0]} has no module in the base model ({model.cfg.n_layer} layers); "
                              "the adapter was made for another architecture")
    if missing:
        raise CheckpointError(f"{where}: {missing[0]} is missing (targets {cfg.target_modules} of every layer are "
                              "needed)")
    for tensor_name, shape in expected.items():
        got = tuple(adapter.tensors[tensor_name].shape)
        if got != shape:
            raise CheckpointError(f"{where}: {tensor_name} has shape {list(got)}, but rank {cfg.rank} on this base "
                                  f"needs {list(shape)}; the adapter does not fit the base")


__all__ = ["ADAPTER_NAME", "check_adapter_names", "load_served_adapters", "merge_adapter_specs",
           "parse_adapter_option"]
