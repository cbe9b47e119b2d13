"""`bastion serve`: load a verified checkpoint, apply the bind / key policy, run uvicorn.

Policy: the server binds 127.0.0.1 unless told otherwise, and refuses to listen on any
other address without API keys (from serve.api_keys_env or serve.key_file). SIGTERM /
Ctrl-C: uvicorn stops accepting connections and waits up to serve.shutdown_grace_s for
in-flight requests; then the engine is shut down.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

from bastion.adapters.serving import check_adapter_names, load_served_adapters
from bastion.checkpoint.contents import manifest_sha256, model_name
from bastion.config.load import hide_env
from bastion.config.schema import BastionConfig
from bastion.errors import CheckpointError, ConfigError
from bastion.infer.engine import Engine
from bastion.infer.loading import LoadedModel, load_for_inference
from bastion.safepath import Roots
from bastion.serve.accesslog import AccessLog
from bastion.serve.app import ServerState, create_app
from bastion.serve.compiling import open_compile_cache
from bastion.serve.keys import KeyStore
from bastion.serve.ratelimit import RateLimiter

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether binding `host` listens on this machine only: localhost, 127.0.0.0/8, ::1.
    `::` and `0.0.0.0` (and the name `0`) are every interface; other names may resolve to
    anything, so they count as reachable."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_state(checkpoint: str | Path, config: BastionConfig, *, device: str = "cpu", verify: bool = True,
                environ: Mapping[str, str] = os.environ, quantize: str | None = None) -> ServerState:
    """Everything the app needs, from the deployment's config (its serve: and generate:
    sections; the checkpoint's own generate: section is not used). Refuses an unsafe bind
    before loading any weights. `quantize`: serve the int8 / int4 weight-only quantized
    model (`load_for_inference`). serve.adapters: LoRA adapters served beside the base
    (`_load_adapters`)."""
    cfg = config.serve
    keys = KeyStore.from_config(cfg, environ=environ)
    loopback = is_loopback(cfg.host)
    if not loopback and not keys.has_keys:
        message = (f"serve.host is {cfg.host}, reachable from other machines, but no API keys are configured: "
                   f"set {cfg.api_keys_env} or serve.key_file (`bastion serve keys add`)")
        raise ConfigError(hide_env(config, message, under="serve"))
    if cfg.require_keys_on_loopback and not keys.has_keys:
        raise ConfigError("serve.require_keys_on_loopback is set but no API keys are configured")
    for name in ("ssl_certfile", "ssl_keyfile"):
        path = getattr(cfg, name)
        if path is not None and not Path(path).is_file():
            raise ConfigError(hide_env(config, f"serve.{name}: {path} is not a file", under="serve"))
    if cfg.adapters and not verify:
        raise ConfigError("serve.adapters needs the base checkpoint verified: an adapter is bound to its base by the "
                          "hash of the base's MANIFEST.json, which proves nothing about unverified weights "
                          "(drop --no-verify)")
    base_sha = manifest_sha256(checkpoint) if cfg.adapters else None
    loaded = load_for_inference(checkpoint, verify=verify, device=device, quantize=quantize, dtype=cfg.dtype)
    name = _safe_name(cfg.model_name or model_name(loaded.directory, loaded.config))
    adapters = _load_adapters(loaded, config, name, base_sha) if cfg.adapters else ()
    compile_cache, notes = open_compile_cache(config, loaded)
    for note in notes:
        logger.warning("%s", note)
    engine = Engine(loaded.model, loaded.tokenizer, config.generate, max_batch_size=cfg.max_concurrency,
                    max_queue=cfg.max_queue, mode=cfg.batch_mode, threads=cfg.threads,
                    prefill_chunk=cfg.prefill_chunk_tokens, prefill_step_tokens=cfg.prefill_step_tokens,
                    prefix_cache_blocks=cfg.prefix_cache_blocks, compile=cfg.compile, compile_cache=compile_cache)
    engine.compile_notes[:0] = notes
    return ServerState(loaded=loaded, cfg=cfg, limits=config.generate, engine=engine, keys=keys, limiter=RateLimiter(cfg.rate_limit),
                       log=AccessLog(cfg.access_log, cfg.log_prompts), model_name=name,
                       require_keys=keys.has_keys or not loopback, adapters=adapters)


def _load_adapters(loaded: LoadedModel, config: BastionConfig, base_name: str, base_sha: str) -> tuple[str, ...]:
    """Verify serve.adapters against the loaded base and install them on its model; their
    names, in order. `base_sha`: the base's manifest hash taken before loading, so a manifest
    replaced while the weights were read is noticed here."""
    cfg = config.serve
    check_adapter_names(list(cfg.adapters), base_name, cfg.max_adapters, "serve.adapters")
    if manifest_sha256(loaded.directory) != base_sha:
        raise CheckpointError(f"{loaded.directory}: MANIFEST.json changed while the base was loaded")
    roots = Roots(config.data.allowed_roots)
    return load_served_adapters(loaded.model, cfg.adapters, base_sha, roots).names


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).strip("-.") or "bastion"
    return cleaned[:128]


class _CurrentStderr(logging.StreamHandler):
    """A StreamHandler on whatever sys.stderr is when a record is written, not the stream of
    the moment it was made: serve() called in-process (a test's CLI runner, a notebook) may
    have a temporary stderr that is closed long before the handler's last record."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _log_to_stderr() -> None:
    """The server's own notes (the engine's compile and compile-cache events) on stderr, at
    INFO, unless the embedding application configured Bastion's logging itself."""
    root = logging.getLogger("bastion")
    if not root.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("bastion serve: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)


def serve(checkpoint: str | Path, config: BastionConfig, *, device: str = "cpu", verify: bool = True,
          quantize: str | None = None) -> None:
    import uvicorn

    cfg = config.serve
    _log_to_stderr()
    state = build_state(checkpoint, config, device=device, verify=verify, quantize=quantize)
    app = create_app(state)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, ssl_certfile=cfg.ssl_certfile,
                            ssl_keyfile=cfg.ssl_keyfile, timeout_graceful_shutdown=int(cfg.shutdown_grace_s) or None,
                            access_log=False, server_header=False, date_header=True, log_level="warning",
                            lifespan="on")

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # type: ignore[no-untyped-def]
            super().handle_exit(sig, frame)
            # uvicorn re-raises the signal once shut down (the process then dies by it); a
            # requested, completed shutdown exits with status 0 instead, as `bastion train` does.
            getattr(self, "_captured_signals", []).clear()

    GracefulServer(config).run()
