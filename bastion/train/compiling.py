"""train.compile_cache: reuse a previous run's torch.compile work (bastion/checkpoint/compile_cache.py).

Before the first step the run's entry is pulled, verified (manifest SHA-256s, then the seal's
HMAC under the local key, then the build it was made for) and loaded into PyTorch's caches;
after the first validation (by then the training step's forward and backward graphs and the
validation graph have compiled), or at the end of a run that validates later or never, what
this process compiled is sealed and pushed - once (see CompileCache.save).
Anything wrong with the cache (missing, refused, a store error) is a note and a cold
compile, never a failed run.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from bastion.checkpoint.compile_cache import CacheEvent, CompileCache, isolated, key_material
from bastion.config.schema import BastionConfig
from bastion.errors import CheckpointError
from bastion.train.distributed import DistEnv


def compile_options(cfg: BastionConfig, env: DistEnv, bf16: bool) -> dict[str, Any]:
    """The settings besides the model's shape that change the graphs a training run compiles."""
    tc, lora = cfg.train, cfg.finetune.lora
    return {"what": "train-step", "objective": tc.objective, "bf16": bf16, "seq_len": tc.seq_len,
            "batch_size": tc.batch_size, "activation_checkpointing": tc.activation_checkpointing,
            "loss_chunk_tokens": tc.loss_chunk_tokens, "lora": lora.model_dump() if lora.enabled else None,
            "world": env.world, "parallel": tc.parallel if env.enabled else None}


class RunCompileCache:
    """The run's side of the cache: a no-op unless train.compile_cache is set."""

    def __init__(self, cache: CompileCache | None, saves: bool):
        self.cache, self.saves = cache, saves
        self.events: list[CacheEvent] = []
        self._isolation: isolated | None = None
        self._inductor_dir = None

    @classmethod
    def open(cls, cfg: BastionConfig, device: torch.device, env: DistEnv, bf16: bool) -> "RunCompileCache":
        tc = cfg.train
        if not (tc.compile and tc.compile_cache):
            return cls(None, saves=False)
        material = key_material(cfg.model.model_dump(mode="json"), compile_options(cfg, env, bf16), device)
        try:
            cache = CompileCache.open(tc.compile_cache, material, key_path=tc.compile_cache_key,
                                      endpoint_url=cfg.checkpoint.endpoint_url, allow_http=cfg.checkpoint.allow_http)
        except CheckpointError as exc:  # a bad key file or location: say so, compile without the cache
            run = cls(None, saves=False)
            run.events.append(CacheEvent("failed", f"compile cache not used: {exc}"))
            return run
        return cls(cache, saves=env.main)  # every rank loads; one seals and pushes

    def __enter__(self) -> "RunCompileCache":
        if self.cache is not None:
            self._isolation = isolated()
            self._inductor_dir = self._isolation.__enter__()
            self.events.append(self.cache.load(self._inductor_dir))
        return self

    def save(self, note: Callable[[str], None]) -> None:
        """After the first validation, and at the end: seal what compiled (the first call
        that finds something new does; later ones are no-ops)."""
        if self.cache is None or not self.saves:
            return
        event = self.cache.save(self._inductor_dir)
        if event is not None:
            self.events.append(event)
            note(f"compile cache: {event.detail}")

    def notes(self) -> list[str]:
        return [f"compile cache {event.kind}: {event.detail}" for event in self.events]

    def __exit__(self, *exc: Any) -> None:
        if self.cache is not None:
            self.cache.close()
        if self._isolation is not None:
            self._isolation.__exit__(*exc)
