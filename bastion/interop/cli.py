"""`bastion import hf DIR OUT` and `bastion export hf|gguf|peft ...` (registered in bastion/cli.py).

Errors are bastion.errors exceptions; the root CLI prints them as one line (exit 2)."""
from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from bastion.checkpoint.cli import RequireSignatureOption, TrustedKeyOption, use_signature_options

out = Console(markup=False)  # paths and names are printed as they are, never read as markup

import_app = typer.Typer(help="Import models from other formats (local folders only; nothing is downloaded).",
                         no_args_is_help=True)
export_app = typer.Typer(help="Export a checkpoint for other tools: Hugging Face transformers, llama.cpp (GGUF), PEFT adapters.",
                         no_args_is_help=True)


class GGUFDType(str, Enum):
    f16 = "f16"
    f32 = "f32"
    q8_0 = "q8_0"
    q4_0 = "q4_0"


_GGUF_DTYPE_HELP = ("Storage type of the weight matrices; norms and biases stay f32. "
                    "f16: half of f32, practically lossless. "
                    "q8_0: 53% of f16 (8.5 bits a weight), each weight within 0.45% of its 32-weight block's "
                    "largest. "
                    "q4_0: about 30% of f16 (4.5 bits a weight), llama.cpp's fast CPU type, each weight within "
                    "1/16 of its block's largest (1/8 at worst); the lm head stays q8_0. "
                    "Matrices whose rows are not a multiple of 32 long stay f16. See docs/quantization.md.")


@import_app.command("hf")
def import_hf_cmd(
    hf_dir: Path = typer.Argument(..., help="Local Hugging Face model folder (config.json, *.safetensors, tokenizer.json)."),
    out_dir: Path = typer.Argument(..., help="New (or empty) folder for the Bastion checkpoint."),
    signing_key: Optional[Path] = typer.Option(None, "--signing-key", help="Sign the checkpoint with this EC private key (PEM, mode 0600)."),
) -> None:
    """Convert a Llama / Mistral / Qwen2 safetensors folder into a verified Bastion checkpoint.
    Refuses remote code (auto_map), other architectures and pickle weights."""
    from bastion.checkpoint.contents import read_trainer_state
    from bastion.interop.hf import import_hf

    if signing_key is not None:
        from bastion.checkpoint.signing import load_private_key, sign_checkpoint

        load_private_key(signing_key)  # a bad key stops the import before any work
    path = import_hf(hf_dir, out_dir)
    if signing_key is not None:
        sign_checkpoint(path, signing_key)
    note = " (chat template kept)" if "chat_template" in read_trainer_state(path) else ""
    out.print(f"imported {hf_dir} -> {path}{note}", highlight=False)


@export_app.command("hf")
def export_hf_cmd(
    ckpt: Path = typer.Argument(..., help="Checkpoint folder (or a folder with 'latest', or a run folder)."),
    out_dir: Path = typer.Argument(..., help="New folder for the Hugging Face model."),
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Write a folder that transformers' AutoModelForCausalLM / AutoTokenizer load (offline), with the
    chat template the model was trained with."""
    from bastion.interop.hf import export_hf

    use_signature_options(require_signature, trusted_keys)
    path = export_hf(ckpt, out_dir)
    out.print(f"exported {ckpt} -> {path}", highlight=False)


@export_app.command("gguf")
def export_gguf_cmd(
    ckpt: Path = typer.Argument(..., help="Checkpoint folder (or a folder with 'latest', or a run folder)."),
    out_path: Path = typer.Argument(..., help="New .gguf file for llama.cpp."),
    dtype: GGUFDType = typer.Option(GGUFDType.f16, "--dtype", help=_GGUF_DTYPE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Write one GGUF file (llama architecture, byte-level BPE vocabulary, chat template) for llama.cpp."""
    from bastion.interop.gguf import export_gguf

    use_signature_options(require_signature, trusted_keys)
    path = export_gguf(ckpt, out_path, dtype=dtype.value, overwrite=force)
    out.print(f"exported {ckpt} -> {path} ({dtype.value})", highlight=False)


@export_app.command("peft")
def export_peft_cmd(
    adapter: Path = typer.Argument(..., help="Adapter folder from a LoRA run (RUN/adapter)."),
    out_dir: Path = typer.Argument(..., help="New folder for adapter_config.json + adapter_model.safetensors."),
    base_model: str = typer.Option(None, "--base-model", help="base_model_name_or_path to record (e.g. the `bastion export hf` folder)."),
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Write the adapter in PEFT's format, for `PeftModel.from_pretrained(model, OUT_DIR)` on the
    base exported with `bastion export hf`."""
    from bastion.interop.peft import export_peft

    use_signature_options(require_signature, trusted_keys)
    path = export_peft(adapter, out_dir, base_model_name_or_path=base_model)
    out.print(f"exported {adapter} -> {path}", highlight=False)


def _eval_files(values: Optional[List[str]]) -> dict:
    from bastion.interop.publish import PublishError

    evals = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if not sep or not name.strip() or not path:
            raise PublishError(f"--eval {value[:120]!r}: expected NAME=FILE (e.g. perplexity=ppl.json)")
        evals[name.strip()] = Path(path)
    return evals


def publish_cmd(
    ckpt: Path = typer.Argument(..., help="Checkpoint folder (or a folder with 'latest', or a run folder); a LoRA "
                                "run's checkpoint publishes its base plus the adapter."),
    repo: Optional[str] = typer.Option(None, "--repo", help="Hub repository NAMESPACE/NAME to create (private) and "
                                       "commit to; required unless --dry-run."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="New folder for the Hub-ready files (required with "
                                           "--dry-run; default: a temporary folder removed after the upload)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Write the folder and run the gate; upload nothing."),
    license: Optional[str] = typer.Option(None, "--license", help="The model's license, an SPDX id (apache-2.0, "
                                          "mit, cc-by-4.0, ...); default: the run config's publish.license. A card "
                                          "without one is refused."),
    canaries: Optional[Path] = typer.Option(None, "--canaries", help="Canary records from `bastion data canaries`: "
                                            "run the memorization audit and refuse above --max-exposure. Required "
                                            "when the training data has canaries planted."),
    max_exposure: Optional[float] = typer.Option(None, "--max-exposure", min=0.01, max=64.0,
                                                 help="Highest canary exposure (bits) allowed; default: the run "
                                                 "config's publish.max_exposure (10). Greedy extraction of a "
                                                 "canary's secret is refused whatever the exposure."),
    evals: Optional[List[str]] = typer.Option(None, "--eval", help="NAME=FILE: numbers from an eval's --json "
                                              "output to show in the card (repeatable)."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Hub URL (default: huggingface_hub's, "
                                           "HF_ENDPOINT or https://huggingface.co); http:// only on loopback."),
    public: bool = typer.Option(False, "--public", help="Create the repository public (default: private)."),
    message: Optional[str] = typer.Option(None, "--message", help="Commit message (default: 'Publish with bastion')."),
    device: str = typer.Option("cpu", "--device", help="Where the memorization audit runs: cpu, cuda or mps."),
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Turn a checkpoint into a Hub-ready folder (the `export hf` files, a model card generated from the
    run, the adapters of a LoRA run) and upload it with huggingface_hub (token from HF_TOKEN, private by
    default) - unless the gate refuses: a secret in any file, canary exposure above the threshold, no
    license, or a checkpoint that fails verification."""
    import tempfile

    from bastion.interop.hub import TOKEN_ENV, check_endpoint, check_repo_id, hub_token, upload_publication
    from bastion.interop.publish import PublishError, PublishOptions, PublishRefused, prepare_publication

    use_signature_options(require_signature, trusted_keys)
    if dry_run and out_dir is None:
        raise PublishError("--dry-run writes the folder only: give it --out DIR")
    token = None
    if not dry_run:
        if repo is None:
            raise PublishError("--repo NAMESPACE/NAME is required to upload (or use --dry-run)")
        check_repo_id(repo)
        if endpoint is not None:
            check_endpoint(endpoint)
        token = hub_token()  # before any work: a missing token is known now
    secret_literals = {f"the {TOKEN_ENV} value": token or os.environ.get(TOKEN_ENV, "")}
    options = PublishOptions(license=license, max_exposure=max_exposure, memorization=_audit(canaries, device),
                             evals=_eval_files(evals), title=repo, secret_literals=secret_literals)
    with tempfile.TemporaryDirectory(prefix="bastion-publish-") as scratch:
        folder = out_dir if out_dir is not None else Path(scratch) / "publish"
        pub = prepare_publication(ckpt, folder, options)
        out.print(f"wrote {pub.folder} ({len(pub.files)} files, license {pub.license or 'none'})", highlight=False)
        if not pub.cleared:
            raise PublishRefused(pub.reasons, pub.folder if out_dir is not None else None)
        if dry_run:
            out.print("gate: cleared (secret scan, canary audit, license, verified checkpoint); dry run: nothing "
                      "uploaded", highlight=False)
            return
        url = upload_publication(pub, repo, token=token, endpoint=endpoint, private=not public, message=message)
    out.print(f"published {ckpt} -> {repo} ({'public' if public else 'private'}): {url}", highlight=False)


def _audit(canaries: Optional[Path], device: str):
    """The memorization audit to run on the verified checkpoint, or None without --canaries."""
    if canaries is None:
        return None

    def run(directory: Path) -> dict:
        from bastion.eval.memorization import audit_memorization

        return audit_memorization(directory, canaries, device=device).to_dict()
    return run
