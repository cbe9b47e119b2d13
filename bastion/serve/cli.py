"""`bastion serve --checkpoint DIR` and `bastion serve keys add|list|revoke`."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from bastion.checkpoint.cli import RequireSignatureOption, TrustedKeyOption, use_signature_options
from bastion.infer.cli import DTypeOption, InferenceDType, Quantization, QuantizeOption, quantize_value
from bastion.serve.keys_cli import keys_app

serve_app = typer.Typer(help="Serve a checkpoint over an OpenAI-compatible HTTP API (keys, rate limits, TLS).")
serve_app.add_typer(keys_app, name="keys")


@serve_app.callback(invoke_without_command=True)
def serve_cmd(
    ctx: typer.Context,
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Checkpoint folder, or a run folder (uses 'latest')."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config; its serve: section holds the server settings."),
    overrides: Optional[List[str]] = typer.Option(None, "--set", help="Override a value, e.g. --set serve.port=9000 (repeatable)."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to bind (default 127.0.0.1; any other needs API keys)."),
    port: Optional[int] = typer.Option(None, "--port", help="TCP port (default 8000)."),
    ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile", help="TLS certificate (PEM); serve HTTPS."),
    ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile", help="TLS private key (PEM)."),
    key_file: Optional[Path] = typer.Option(None, "--key-file", help="Hashed API key file from `bastion serve keys add`."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or mps."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip the checkpoint's SHA-256 manifest check (not recommended)."),
    quantize: Optional[Quantization] = QuantizeOption,
    dtype: Optional[InferenceDType] = DTypeOption,
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
    adapters: Optional[List[str]] = typer.Option(None, "--adapter", help="Serve a LoRA adapter folder beside the base "
                                                 "as model NAME: NAME=PATH (repeatable; adds to serve.adapters)."),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the decode step before the server is ready "
                                  "(serve.compile; padded batch mode)."),
    compile_cache: Optional[str] = typer.Option(None, "--compile-cache", help="With --compile: reuse sealed compiled "
                                                "code from this folder or store URL (serve.compile_cache)."),
) -> None:
    """Serve /v1/completions, /v1/chat/completions, /v1/models, /health, /ready and /metrics.
    Keys come from $BASTION_API_KEYS (comma-separated) or --key-file; they are required on
    every route but /health when the server is reachable from another host."""
    if ctx.invoked_subcommand is not None:
        return
    if checkpoint is None:
        raise typer.BadParameter("--checkpoint is required", param_hint="--checkpoint")
    from bastion.config import load_config
    from bastion.serve.server import serve

    # Options are typed values set as they are: never a `--set` string re-read as YAML, where
    # `--host 0` became the number 0 and `--host ::` a mapping.
    options = {"host": host, "port": port, "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile,
               "key_file": key_file, "dtype": dtype.value if dtype is not None else None,
               "compile": True if compile_ else None, "compile_cache": compile_cache}
    values = {f"serve.{name}": str(value) if isinstance(value, Path) else value
              for name, value in options.items() if value is not None}
    cfg = load_config(config, overrides or [], values=values)
    use_signature_options(require_signature, trusted_keys, cfg)
    if adapters:
        add_adapter_options(cfg, adapters)
    serve(checkpoint, cfg, device=device, verify=not no_verify, quantize=quantize_value(quantize))


def add_adapter_options(cfg, options: list[str]) -> None:  # noqa: ANN001 - a BastionConfig (imported late)
    """`--adapter NAME=PATH` options added to cfg.serve.adapters, names checked as the
    config's are (the base's name is checked once it is known, at startup)."""
    from bastion.adapters.serving import check_adapter_names, merge_adapter_specs, parse_adapter_option

    extra: dict[str, str] = {}
    for option in options:
        name, path = parse_adapter_option(option)
        if name in extra:
            raise typer.BadParameter(f"adapter name {name!r} is given twice", param_hint="--adapter")
        extra[name] = path
    merged = merge_adapter_specs(cfg.serve.adapters, extra)
    check_adapter_names(list(merged), cfg.serve.model_name, cfg.serve.max_adapters, "--adapter")
    cfg.serve.adapters = merged
