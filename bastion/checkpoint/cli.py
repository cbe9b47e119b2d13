"""`bastion ckpt ...`: verify, inspect, sign, keygen, prune, convert, pack/unpack, push/pull/list.

Also the signature options every command that loads a checkpoint takes (`RequireSignatureOption`,
`TrustedKeyOption`, `use_signature_options`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from bastion.errors import BastionError

app = typer.Typer(help="Checkpoints: verify, inspect, sign, prune, convert, pack/unpack, push/pull/list.",
                  no_args_is_help=True)
out = Console(markup=False)  # plain text; a BastionError raised by any command is reported by bastion.cli (exit 2)

RequireSignatureOption = typer.Option(
    False, "--require-signature", envvar="BASTION_REQUIRE_SIGNATURE",
    help="Refuse any checkpoint not signed by a trusted key (see `bastion ckpt sign`; env BASTION_REQUIRE_SIGNATURE=1).")
TrustedKeyOption = typer.Option(
    None, "--trusted-key", envvar="BASTION_TRUSTED_KEYS",
    help="Public key (PEM) whose signatures are trusted (repeatable; env BASTION_TRUSTED_KEYS, ':'-separated).")


def use_signature_options(require: bool, trusted_keys: Optional[List[Path]], config: Any = None) -> None:
    """Set this command's signature policy from its flags (and a loaded config's checkpoint
    section): every checkpoint it then loads is checked in load_checkpoint."""
    from bastion.checkpoint.signing import SignaturePolicy, set_signature_policy

    policy = SignaturePolicy().merged(require, trusted_keys or [])
    if config is not None:
        policy = policy.merged(config.checkpoint.require_signature, config.checkpoint.trusted_keys)
    set_signature_policy(policy)


@app.command("verify")
def verify(
    path: Path = typer.Argument(..., help="Checkpoint folder, a folder with 'latest', or a packed checkpoint."),
    base: Optional[Path] = typer.Option(None, help="The base checkpoint a delta pack was made against."),
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Check every file against MANIFEST.json (size, SHA-256, no extra files or links), its
    format (safetensors layout, JSON, YAML), and the signature when keys are trusted; a packed
    checkpoint is decompressed (bounded) and checked the same way, nothing written. Exit 2 on
    any problem."""
    from bastion.checkpoint.checkpoint import verified_headers
    from bastion.checkpoint.pack import PACK, verify_packed
    from bastion.checkpoint.signing import check_signature

    use_signature_options(require_signature, trusted_keys)
    if (path / PACK).exists():
        if require_signature:
            raise BastionError(f"{path}: a packed checkpoint carries no signature; unpack it and verify that")
        pack = verify_packed(path, base=base)
        out.print(f"{path}: OK (packed, {len(pack['files'])} files, all decompress to their SHA-256)")
        return
    directory, manifest, headers = verified_headers(path)
    tensors = sum(len(h) for h in headers.values())
    signer = check_signature(directory)
    signed = f", signed by key {signer}" if signer else ""
    out.print(f"{directory}: OK ({len(manifest['files'])} files, {tensors} tensors, all SHA-256 match{signed})")


@app.command("inspect")
def inspect(
    path: Path = typer.Argument(..., help="Checkpoint folder (or a folder with 'latest')."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Show a checkpoint's manifest, training state and tensors (after verifying it)."""
    from bastion.checkpoint.checkpoint import verified_headers
    from bastion.checkpoint.contents import read_trainer_state

    use_signature_options(require_signature, trusted_keys)
    directory, manifest, headers = verified_headers(path)
    state = read_trainer_state(directory)
    summary = {
        "path": str(directory), "format_version": manifest["format_version"],
        "bastion_version": manifest.get("bastion_version"), "created_unix": manifest.get("created_unix"),
        "step": state.get("step"), "val_loss": state.get("val_loss"), "tokens_seen": state.get("tokens_seen"),
        "files": {name: entry["size"] for name, entry in manifest["files"].items()},
        "tensors": {f: {t: {"dtype": i["dtype"], "shape": i["shape"]} for t, i in h.items()} for f, h in headers.items()},
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=str(directory), show_header=True)
    for col in ("file", "bytes", "tensors", "parameters", "dtypes"):
        table.add_column(col)
    for name, size in summary["files"].items():
        header = headers.get(name, {})
        params = sum(_numel(i["shape"]) for i in header.values())
        dtypes = ",".join(sorted({i["dtype"] for i in header.values()}))
        table.add_row(name, f"{size:,}", str(len(header)) if header else "", f"{params:,}" if header else "", dtypes)
    out.print(table)
    out.print(f"step {summary['step']}, val loss {summary['val_loss']}, tokens seen {summary['tokens_seen']}; "
              f"format v{summary['format_version']}, bastion {summary['bastion_version']}")


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@app.command("sign")
def sign_cmd(
    path: Path = typer.Argument(..., help="Checkpoint or adapter folder (or a folder with 'latest')."),
    key: Path = typer.Option(..., "--key", help="Elliptic-curve private key (PEM, mode 0600; `bastion ckpt keygen`)."),
) -> None:
    """Verify every file, then sign the checkpoint (model.sig beside MANIFEST.json, OpenSSF
    model-signing format: `model_signing verify key` checks it too)."""
    from bastion.checkpoint import resolve_checkpoint
    from bastion.checkpoint.signing import SIGNATURE, sign_checkpoint

    directory = resolve_checkpoint(path)
    signer = sign_checkpoint(directory, key)
    out.print(f"signed {directory} with key {signer}: {directory / SIGNATURE}")


@app.command("keygen")
def keygen_cmd(
    private_key: Path = typer.Argument(..., help="New private key file (written 0600); the public key goes to PRIVATE_KEY.pub."),
) -> None:
    """Make a P-256 signing key pair for `bastion ckpt sign` and checkpoint.signing_key."""
    from bastion.checkpoint.signing import generate_key, key_id, load_public_key

    private, public = generate_key(private_key)
    out.print(f"wrote {private} (private, 0600) and {public} (public, key {key_id(load_public_key(public))[:16]})")


@app.command("prune")
def prune_cmd(
    root: Path = typer.Argument(..., help="Folder holding step_* checkpoints (e.g. RUN/checkpoints)."),
    keep_last: int = typer.Option(3, min=1, help="Keep the newest N."),
    keep_best: int = typer.Option(0, min=0, help="Also keep the N with the lowest validation loss."),
    keep_every: Optional[int] = typer.Option(None, min=1, help="Also keep steps that are multiples of K."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print what would be deleted."),
) -> None:
    """Delete old checkpoints by a retention policy (never the one 'latest' names)."""
    from bastion.checkpoint.checkpoint import Retention, prune, to_prune

    policy = Retention(keep_last, keep_best, keep_every)
    if dry_run:
        for path in to_prune(root, policy):
            out.print(f"would delete {path}")
        return
    for path in prune(root, policy):
        out.print(f"deleted {path}")


@app.command("convert")
def convert_cmd(
    src: Path = typer.Argument(..., help="PyTorch pickle checkpoint (.pt/.pth/.bin, torch.save zip format)."),
    out_dir: Path = typer.Argument(..., help="New folder for model.safetensors + MANIFEST.json."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Required: you accept reading a pickle file. "
                                      "It is scanned opcode by opcode and loaded with torch.load(weights_only=True)."),
) -> None:
    """Convert a pickle checkpoint to safetensors through a scanned, restricted load."""
    from bastion.checkpoint.convert import convert_pickle

    path = convert_pickle(src, out_dir, allow_pickle=allow_pickle)
    out.print(f"wrote {path} (safetensors + MANIFEST.json)")


@app.command("pack")
def pack_cmd(
    src: Path = typer.Argument(..., help="Checkpoint folder to compress."),
    dst: Path = typer.Argument(..., help="New folder for the packed checkpoint."),
    base: Optional[Path] = typer.Option(None, help="Store tensors as deltas against this checkpoint (fine-tunes, consecutive steps)."),
    level: int = typer.Option(3, help="zstd level (-7..22)."),
    threads: Optional[int] = typer.Option(None, help="Compression threads (default: all cores)."),
) -> None:
    """Lossless compression: byte-plane split + zstd, bit-exact round trip, verified."""
    from bastion.checkpoint.pack import pack_checkpoint

    report = pack_checkpoint(src, dst, base=base, level=level, threads=threads)
    out.print(f"{report.original_bytes:,} -> {report.packed_bytes:,} bytes (ratio {report.ratio:.3f}) "
              f"in {report.seconds:.2f} s ({report.mb_per_s:.0f} MB/s): {dst}")


@app.command("unpack")
def unpack_cmd(
    packed: Path = typer.Argument(..., help="Packed checkpoint folder."),
    dst: Path = typer.Argument(..., help="New folder for the restored checkpoint."),
    base: Optional[Path] = typer.Option(None, help="The base checkpoint a delta pack was made against."),
    threads: Optional[int] = typer.Option(None, help="Decompression threads (default: all cores)."),
) -> None:
    """Restore a packed checkpoint; the result is verified against its original manifest."""
    from bastion.checkpoint.pack import unpack_checkpoint

    path = unpack_checkpoint(packed, dst, base=base, threads=threads)
    out.print(f"restored and verified {path}")


EndpointOption = typer.Option(None, "--endpoint-url", help="S3-compatible endpoint (https; http only on loopback with --allow-http).")
AllowHttpOption = typer.Option(False, "--allow-http", help="Permit a plain-http endpoint on a loopback address (tests, local servers).")


def _store(url: str, endpoint_url: Optional[str], allow_http: bool):
    from bastion.checkpoint.stores import open_store

    return open_store(url, endpoint_url=endpoint_url, allow_http=allow_http)


@app.command("push")
def push_cmd(
    path: Path = typer.Argument(..., help="Checkpoint folder (or a folder with 'latest')."),
    url: str = typer.Argument(..., help="Store: s3://bucket/prefix, file:///abs/path or a local folder."),
    name: Optional[str] = typer.Option(None, help="Name in the store (default: the checkpoint folder's name)."),
    endpoint_url: Optional[str] = EndpointOption,
    allow_http: bool = AllowHttpOption,
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Upload a verified checkpoint; its manifest goes last, so a broken upload stays invisible.
    S3 credentials come only from the environment / standard AWS configuration."""
    from bastion.checkpoint import resolve_checkpoint
    from bastion.checkpoint.signing import check_signature

    use_signature_options(require_signature, trusted_keys)
    check_signature(resolve_checkpoint(path))  # the push then hashes every file against that manifest
    _store(url, endpoint_url, allow_http).push(path, name)
    out.print(f"pushed {path} to {url}")


@app.command("pull")
def pull_cmd(
    url: str = typer.Argument(..., help="Store: s3://bucket/prefix, file:///abs/path or a local folder."),
    name: str = typer.Argument(..., help="Checkpoint name in the store, or 'latest'."),
    dest: Path = typer.Argument(..., help="New local folder for the checkpoint."),
    max_bytes: int = typer.Option(1 << 40, help="Refuse checkpoints whose manifest declares more bytes than this."),
    endpoint_url: Optional[str] = EndpointOption,
    allow_http: bool = AllowHttpOption,
) -> None:
    """Download a checkpoint (resumable), verify every file, then move it into place."""
    store = _store(url, endpoint_url, allow_http)
    if name == "latest":
        name = store.latest()
        if name is None:
            raise BastionError(f"{url}: the store holds no checkpoint")
    path = store.pull(name, dest, max_bytes=max_bytes)
    out.print(f"pulled and verified {name} into {path}")


@app.command("list")
def list_cmd(
    location: str = typer.Argument(..., help="A local checkpoints folder, or a store URL (s3://..., file://...)."),
    endpoint_url: Optional[str] = EndpointOption,
    allow_http: bool = AllowHttpOption,
) -> None:
    """List checkpoints (local: with step, size and validation loss; stores: names)."""
    from bastion.checkpoint import list_checkpoints, resolve_checkpoint
    from bastion.checkpoint.contents import read_trainer_state

    if "://" in location:
        store = _store(location, endpoint_url, allow_http)
        latest = store.latest()
        for name in store.list():
            out.print(f"{name}{'  (latest)' if name == latest else ''}")
        return
    root = Path(location)
    found = list_checkpoints(root) or list_checkpoints(root / "checkpoints")
    latest = resolve_checkpoint(location) if found else None
    table = Table(show_header=True)
    for col in ("checkpoint", "step", "bytes", "val loss", ""):
        table.add_column(col)
    for ckpt in found:
        try:
            state = read_trainer_state(ckpt)
        except BastionError:
            state = {}  # a damaged checkpoint is still listed (`ckpt verify` says what is wrong)
        size = sum(p.stat().st_size for p in ckpt.iterdir())
        val = state.get("val_loss")
        table.add_row(str(ckpt), str(state.get("step", "")), f"{size:,}", f"{val:.4f}" if val is not None else "",
                      "latest" if latest == ckpt else "")
    out.print(table)
