"""serve.compile_cache: reuse a previous start's torch.compile work (bastion/checkpoint/compile_cache.py).

The engine (bastion/infer/engine.py, `compile=True`) compiles its decode step while it starts;
with a cache it first pulls this build's entry, verifies it (manifest SHA-256s, then the seal's
HMAC under the local key, then the build it was made for) and loads it, and after the warm-up
seals and pushes what it compiled. Anything wrong with the cache (missing, refused, a store
error, an unusable key) is a note in the server log and a cold compile, never a failed start.
"""
from __future__ import annotations

from typing import Any

import torch

from bastion.checkpoint.compile_cache import CacheEvent, CompileCache, key_material
from bastion.config.schema import BastionConfig
from bastion.errors import CheckpointError
from bastion.infer.engine import PROBE_ROWS
from bastion.infer.loading import LoadedModel


def compile_options(config: BastionConfig, loaded: LoadedModel) -> dict[str, Any]:
    """The serving settings besides the model's shape that change the graphs the engine compiles."""
    cfg = config.serve
    return {"what": "serve-decode-rows", "batch_mode": cfg.batch_mode, "dtype": loaded.dtype,
            "quantize": loaded.quantization, "probe_rows": min(cfg.max_concurrency, PROBE_ROWS),
            "threads": cfg.threads, "adapters": sorted(cfg.adapters)}


def open_compile_cache(config: BastionConfig, loaded: LoadedModel) -> tuple[CompileCache | None, list[str]]:
    """The engine's cache for this server's build, or None (with why) when serve.compile_cache
    is unset or its key file or location is unusable: the server then compiles uncached."""
    cfg = config.serve
    if not (cfg.compile and cfg.compile_cache):
        return None, []
    device = loaded.model.tok_embeddings.weight.device
    material = key_material(loaded.config.model.model_dump(mode="json"), compile_options(config, loaded),
                            torch.device(device))
    try:
        cache = CompileCache.open(cfg.compile_cache, material, key_path=cfg.compile_cache_key,
                                  endpoint_url=config.checkpoint.endpoint_url, allow_http=config.checkpoint.allow_http)
    except CheckpointError as exc:
        event = CacheEvent("failed", f"compile cache not used: {exc}")
        return None, [f"compile cache {event.kind}: {event.detail}"]
    return cache, []


__all__ = ["compile_options", "open_compile_cache"]
