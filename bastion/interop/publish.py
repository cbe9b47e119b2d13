"""`bastion publish`, the folder and the gate: a checkpoint -> a Hub-ready folder, refused
unless it is safe to share.

The folder (written atomically, 0700 / 0600):

    config.json, model.safetensors, tokenizer*.json, generation_config.json
                        `bastion export hf` of the model (a LoRA run: of its verified base)
    adapter/            a LoRA run only: its adapters in PEFT's format (`bastion export peft`)
    README.md           the model card, generated from the run: the data report with its hygiene
                        counts, the training config (secrets redacted), eval numbers, the
                        memorization audit, the license (YAML front matter the Hub reads)

The gate refuses, giving every reason at once, when
  * the checkpoint fails verification (manifest, SHA-256, formats, signature when required)
    - checked before anything is written, so the other checks never see unverified bytes;
  * the secret scan of every file in the folder finds something (`interop/filescan.py`: the
    data pipeline's detectors, plus the upload token's exact value);
  * canaries were planted in the training data (its index.json lists canary shards) and no
    memorization audit was given, or a canary's exposure is above the threshold, or greedy
    decoding spells a canary's secret out;
  * the card has no license.

The memorization audit is measured by `bastion eval memorization` code in `eval/` (a layer
above this one); the command runs it and hands its report (`MemorizationReport.to_dict()`,
secrets never included) to `prepare_publication`.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

import bastion
from bastion.checkpoint.checkpoint import Checkpoint, load_checkpoint, read_checkpoint_file, verified_headers
from bastion.checkpoint.contents import (
    MAX_CONFIG_YAML_BYTES,
    adapters_only,
    checkpoint_config,
    lora_base,
    manifest_sha256,
    model_name,
    read_trainer_state,
)
from bastion.config.load import to_yaml
from bastion.config.schema import BastionConfig
from bastion.errors import BastionError, CheckpointError, DataError
from bastion.interop.filescan import ScannedFile, ScanResult, scan_folder
from bastion.interop.hf import export_hf
from bastion.interop.peft import peft_files
from bastion.model.lora import is_lora_name
from bastion.safeio import DIR_MODE, read_json_limited, write_bytes, write_dir_atomic

CARD = "README.md"
ADAPTER_DIR = "adapter"
MAX_REPORT_BYTES = 1 * 2**20
MAX_INDEX_BYTES = 16 * 2**20
MAX_EVAL_BYTES = 1 * 2**20
MAX_EVAL_VALUES = 200
LICENSE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+-]{0,63}")


class PublishError(BastionError):
    """`bastion publish` cannot go on: bad options, the Hub said no, the folder is not writable."""


class PublishRefused(PublishError):
    """The pre-publish gate refused; `reasons` holds one line per reason."""

    def __init__(self, reasons: list[str], folder: Path | None = None):
        where = f" (the folder is kept for inspection: {folder})" if folder is not None else ""
        super().__init__(f"publish refused{where}:\n" + "\n".join(reasons))
        self.reasons = reasons
        self.folder = folder


@dataclass
class PublishOptions:
    license: str | None = None  # SPDX id; None: the checkpoint config's publish.license
    max_exposure: float | None = None  # bits; None: the checkpoint config's publish.max_exposure
    # The canary audit of this checkpoint: MemorizationReport.to_dict(), or a function that
    # measures it given the verified checkpoint's folder (run only after verification).
    memorization: dict[str, Any] | Callable[[Path], dict[str, Any]] | None = None
    evals: dict[str, Path] = field(default_factory=dict)  # name -> JSON written by `bastion eval ... --json`
    title: str | None = None  # the card's heading (the repo id when uploading)
    secret_literals: dict[str, str] = field(default_factory=dict)  # label -> exact value never to publish


@dataclass
class Publication:
    folder: Path
    files: list[ScannedFile]  # what the gate cleared: name, size, SHA-256 as scanned
    reasons: list[str]  # why it is refused; empty when cleared
    license: str | None
    card: str

    @property
    def cleared(self) -> bool:
        return not self.reasons


# ---- what the run says about itself -------------------------------------------------------

@dataclass
class _RunFacts:
    directory: Path  # the verified checkpoint
    state: dict[str, Any]  # its trainer_state.json
    config: BastionConfig
    model_dir: Path  # the full model exported at the folder's root (a LoRA run: its base)
    lora_tensors: dict[str, torch.Tensor] | None  # a LoRA run's adapters; None for a full model
    data: dict[str, Any] = field(default_factory=dict)  # report.json / index.json facts of train.data_dir
    data_note: str = ""  # how the data was found (or why not)

    @property
    def lora(self) -> bool:
        return self.lora_tensors is not None


def _verified(ckpt_path: str | Path) -> _RunFacts:
    """The checkpoint verified (every file's hash and format, the signature when required) with
    no tensor built, its config and trainer state; a LoRA run's adapters and its base (verified
    too: it is published as well). A CheckpointError here is the gate's first refusal."""
    directory, _, _ = verified_headers(ckpt_path)
    config_yaml = read_checkpoint_file(directory, "config.yaml", MAX_CONFIG_YAML_BYTES)
    if config_yaml is None:
        raise CheckpointError(f"{directory}: has no config.yaml")
    state = read_trainer_state(directory)
    config = checkpoint_config(Checkpoint(model={}, trainer_state=state, config_yaml=config_yaml.decode("utf-8"),
                                          tokenizer_json="", directory=directory))
    if not adapters_only(config):
        return _RunFacts(directory, state, config, directory, None)
    if config.model.score_labels is not None:
        raise PublishError(f"{directory}: a LoRA run with a score head ({config.train.objective}); PEFT folders do "
                           "not carry it - merge the run (`bastion merge BASE RUN OUT`) and publish the merged "
                           "checkpoint")
    ckpt = load_checkpoint(directory, verify=True, load_optimizer=False)  # adapters only: small
    base = lora_base(ckpt)
    verified_headers(base)
    tensors = {k: v for k, v in ckpt.model.items() if is_lora_name(k)}
    return _RunFacts(directory, state, config, base, tensors)


def _data_facts(config: BastionConfig) -> tuple[dict[str, Any], str]:
    """The prepared dataset's report.json and index.json facts (hygiene counts, canary shards)."""
    if config.train.objective != "clm":
        return {}, f"fine-tuned on `{Path(str(config.finetune.train_file)).name}` (a JSONL file; no prepare report)"
    data_dir = Path(config.train.data_dir)
    if not (data_dir / "index.json").is_file():
        return {}, (f"the prepared dataset `{data_dir.name}` is not found from here, so its report (and whether "
                    "canaries were planted in it) is not known")
    index = read_json_limited(data_dir / "index.json", MAX_INDEX_BYTES, DataError, "dataset index")
    facts: dict[str, Any] = {"canary_shards": index.get("canary_shards") or [] if isinstance(index, dict) else []}
    if (data_dir / "report.json").is_file():
        report = read_json_limited(data_dir / "report.json", MAX_REPORT_BYTES, DataError, "data report")
        if isinstance(report, dict):
            facts["report"] = report
    return facts, f"prepared dataset `{data_dir.name}`"


def _run_facts(ckpt_path: str | Path) -> _RunFacts:
    try:
        facts = _verified(ckpt_path)
    except CheckpointError as exc:
        raise PublishRefused([f"the checkpoint fails verification: {exc}"]) from None
    facts.data, facts.data_note = _data_facts(facts.config)
    return facts


def _read_evals(evals: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Each eval JSON's numbers (top level, and one level down as "a.b"), for the card."""
    out: dict[str, dict[str, int | float]] = {}
    for name, path in evals.items():
        data = read_json_limited(Path(path), MAX_EVAL_BYTES, PublishError, f"eval results ({name})")
        if not isinstance(data, dict):
            raise PublishError(f"{path}: eval results must be a JSON object")
        numbers: dict[str, int | float] = {}
        for key, value in data.items():
            inner = value.items() if isinstance(value, dict) else [("", value)]
            for sub, v in inner:
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    numbers[f"{key}.{sub}" if sub else str(key)] = v
        if not numbers:
            raise PublishError(f"{path}: no numbers found in the eval results")
        out[name] = dict(list(numbers.items())[:MAX_EVAL_VALUES])
    return out


# ---- the gate -------------------------------------------------------------------------------

def _audit_reasons(facts: _RunFacts, audit: dict[str, Any] | None, threshold: float) -> list[str]:
    planted = facts.data.get("canary_shards")
    if audit is not None and Path(str(audit.get("checkpoint"))).resolve() != facts.directory.resolve():
        return [f"the memorization audit given is of {str(audit.get('checkpoint'))[:200]}, not of this checkpoint"]
    if audit is None:
        if planted:
            return [f"canaries were planted in the training data ({len(planted)} canary shard(s) in its index.json) "
                    "but no memorization audit was run: pass --canaries RECORDS (the file `bastion data canaries` "
                    "wrote)"]
        return []
    results = audit.get("results")
    if not isinstance(results, list) or not results:
        return ["the memorization audit has no results"]
    reasons = []
    for r in results:
        if r.get("greedy_hit"):
            reasons.append(f"canary {r.get('id')} (repeated {r.get('repeats')}x) is extracted by greedy decoding: "
                           "the model reproduces its secret")
        elif float(r.get("exposure", 0.0)) > threshold:
            reasons.append(f"canary {r.get('id')} (repeated {r.get('repeats')}x) has exposure "
                           f"{float(r['exposure']):.2f} bits, above the threshold of {threshold:g} "
                           f"(publish.max_exposure / --max-exposure; its maximum is {float(r.get('max_exposure', 0)):.2f})")
    return reasons


def _scan_reasons(scan: ScanResult) -> list[str]:
    reasons = [f"secret scan: {finding}" for finding in scan.findings]
    if scan.truncated:
        reasons.append(f"secret scan: more findings not listed (the first {len(scan.findings)} are)")
    return reasons


def check_license(value: str | None) -> str | None:
    if value is None:
        return None
    if not LICENSE.fullmatch(value):
        raise PublishError(f"--license {value[:80]!r}: not an SPDX-style id (letters, digits, '.', '+', '-'; "
                           "e.g. apache-2.0, mit, cc-by-4.0)")
    return value.lower()  # the Hub's license ids are lower case


# ---- the card ---------------------------------------------------------------------------------

def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {head[0]} | {head[1]} |", "|---|---:|"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    elif isinstance(value, int):
        value = f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _data_section(facts: _RunFacts) -> str:
    lines = ["## Training data", "", f"Source: {facts.data_note}."]
    report = facts.data.get("report")
    if report:
        rows = [("source files", report.get("files")), ("documents read", report.get("documents_read")),
                ("documents kept", report.get("documents")),
                ("exact duplicates dropped", report.get("duplicates_dropped")),
                ("near-duplicates dropped", report.get("near_duplicates_dropped"))]
        rows += [(f"filtered: {reason}", n) for reason, n in sorted((report.get("filtered") or {}).items())]
        rows += [(f"redacted: {category}", n) for category, n in sorted((report.get("redactions") or {}).items())]
        for split in ("train", "val"):
            if isinstance(report.get(split), dict):
                rows.append((f"{split} tokens", report[split].get("tokens")))
        lines += ["", "Hygiene, as `bastion data prepare` reported it (quality filters, PII / secret redaction, "
                  "exact and near-duplicate removal):", "", _table([r for r in rows if r[1] is not None],
                                                                     ("step", "count"))]
    planted = facts.data.get("canary_shards")
    if planted:
        docs = sum(int(s.get("documents", 0)) for s in planted if isinstance(s, dict))
        lines += ["", f"Canaries: {len(planted)} shard(s) of {docs:,} canary documents were planted to measure "
                  "memorization (see the audit below)."]
    return "\n".join(lines)


def _training_section(facts: _RunFacts) -> str:
    state, config = facts.state, facts.config
    rows = [("objective", config.train.objective), ("steps", state.get("step")),
            ("tokens seen", state.get("tokens_seen"))]
    if config.train.dp.enabled:
        dp = config.train.dp
        rows.append(("DP-SGD", f"target epsilon {dp.target_epsilon:g}, delta {dp.delta if dp.delta is not None else 'auto'}, "
                               f"per-example clip {dp.max_grad_norm:g}"))
    if facts.lora:
        lora = config.finetune.lora
        rows.append(("LoRA", f"rank {lora.rank}, alpha {lora.alpha:g}, on {', '.join(lora.target_modules)}"))
    text = to_yaml(config)
    return "\n".join(["## Training", "", _table([r for r in rows if r[1] is not None], ("", "")), "",
                      "<details><summary>The run's config (secrets redacted)</summary>", "", "```yaml", text.rstrip(),
                      "```", "", "</details>"])


def _eval_section(facts: _RunFacts, evals: dict[str, dict[str, float]]) -> str:
    state = facts.state
    rows: list[tuple[str, Any]] = []
    for key, label in (("val_loss", "validation loss"), ("best_val_loss", "best validation loss")):
        value = state.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            rows.append((label, float(value)))
            if key == "val_loss" and value < 50:
                rows.append(("validation perplexity", math.exp(value)))
    for name, numbers in evals.items():
        rows += [(f"{name}: {k}", v) for k, v in numbers.items()]
    body = _table(rows, ("metric", "value")) if rows else "No evaluation was recorded with this checkpoint."
    return "\n".join(["## Evaluation", "", body])


def _audit_section(facts: _RunFacts, audit: dict[str, Any] | None, threshold: float) -> str:
    lines = ["## Memorization audit", ""]
    if audit is None:
        known_clean = "canary_shards" in facts.data and not facts.data["canary_shards"]
        lines.append("No canaries were planted in the training data, so no audit was run." if known_clean
                     else "No canary audit was run.")
        return "\n".join(lines)
    lines += [f"Canary exposure (Carlini et al., *The Secret Sharer*): log2 of the candidate space minus log2 of "
              f"the secret's rank; about 1 bit means not learnt, the maximum means memorized. The publish gate "
              f"refuses above {threshold:g} bits or on greedy extraction.", "",
              "| canary | repeats | exposure | max | greedy hit |", "|---|---:|---:|---:|---|"]
    for r in audit.get("results", []):
        at_least = "≥" if r.get("beyond_resolution") else ""
        lines.append(f"| {_cell(r.get('id'))} | {_cell(r.get('repeats'))} | {at_least}{float(r.get('exposure', 0)):.2f} "
                     f"| {float(r.get('max_exposure', 0)):.2f} | {'yes' if r.get('greedy_hit') else 'no'} |")
    return "\n".join(lines)


def config_kind(config: BastionConfig) -> str:
    return {"reward": "reward", "classify": "classification", "regress": "regression"}.get(config.train.objective,
                                                                                           "scoring")


def _usage(facts: _RunFacts, repo: str) -> str:
    auto = "AutoModelForSequenceClassification" if facts.config.model.score_labels is not None else "AutoModelForCausalLM"
    lines = ["## Use", "", "```python", f"from transformers import {auto}, AutoTokenizer", "",
             f'model = {auto}.from_pretrained("{repo}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{repo}")']
    if facts.lora:
        lines += ["", "from peft import PeftModel", "",
                  f'model = PeftModel.from_pretrained(model, "{repo}", subfolder="{ADAPTER_DIR}")']
    return "\n".join([*lines, "```"])


def model_card(facts: _RunFacts, *, license: str | None, title: str, audit: dict[str, Any] | None,
               threshold: float, evals: dict[str, dict[str, float]]) -> str:
    cfg = facts.config.model
    classifier = cfg.score_labels is not None
    meta: dict[str, Any] = {"license": license or "unknown", "library_name": "transformers",
                            "pipeline_tag": "text-classification" if classifier else "text-generation",
                            "tags": ["bastion", "safetensors", *(["peft", "lora"] if facts.lora else [])]}
    front = yaml.safe_dump(meta, sort_keys=False).rstrip()
    source = manifest_sha256(facts.directory)
    about = (f"A {cfg.n_layer}-layer transformer (d_model {cfg.d_model}, {cfg.n_head} heads, context "
             f"{cfg.max_seq_len}, vocabulary {cfg.vocab_size:,}"
             + (f", a {config_kind(facts.config)} head" if classifier else "")
             + f") trained with Bastion {bastion.__version__}"
             + (", published as its base model plus a LoRA adapter in `adapter/`" if facts.lora else "") + ".")
    parts = [f"---\n{front}\n---", f"# {title}", about,
             f"Published from the checkpoint whose MANIFEST.json has SHA-256 `{source}`.",
             _usage(facts, title), _data_section(facts), _training_section(facts), _eval_section(facts, evals),
             _audit_section(facts, audit, threshold),
             "## License\n\n" + (f"`{license}`" if license else "No license was given.")]
    return "\n\n".join(parts) + "\n"


# ---- the folder -----------------------------------------------------------------------------

def _check_out_dir(out_dir: Path) -> None:
    if out_dir.is_symlink() or (out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))):
        raise PublishError(f"{out_dir}: already exists and is not an empty folder; choose a new --out")


def _move_in(src: Path) -> Callable[[Path], None]:
    """A write_dir_atomic writer that moves an already private, fsynced file into place."""
    return lambda dst: os.replace(src, dst)


def _adapter_writer(facts: _RunFacts) -> Callable[[Path], None]:
    files = peft_files(facts.lora_tensors or {}, facts.config.finetune.lora, facts.directory,
                       base_model_name_or_path="..")

    def write(path: Path) -> None:
        os.mkdir(path, DIR_MODE)
        for name, data in files.items():
            write_bytes(path / name, data)
    return write


def _write_folder(facts: _RunFacts, out_dir: Path, card: str) -> None:
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        exported = export_hf(facts.model_dir, staging / "hf")
        files: dict[str, Any] = {p.name: _move_in(p) for p in sorted(exported.iterdir())}
        if facts.lora:
            files[ADAPTER_DIR] = _adapter_writer(facts)
        files[CARD] = card.encode("utf-8")
        write_dir_atomic(out_dir, files)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare_publication(ckpt_path: str | Path, out_dir: str | Path, options: PublishOptions | None = None) -> Publication:
    """Verify the checkpoint, write the Hub-ready folder at `out_dir` (new or empty), scan it and
    run the gate. Returns the Publication (`reasons` empty when cleared); the folder is kept
    either way (a refused one is where to look). Raises PublishRefused - before writing
    anything - when the checkpoint fails verification."""
    options = options or PublishOptions()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    license = check_license(options.license)
    facts = _run_facts(ckpt_path)
    license = license or check_license(facts.config.publish.license)
    threshold = options.max_exposure if options.max_exposure is not None else facts.config.publish.max_exposure
    evals = _read_evals(options.evals)
    title = options.title or model_name(facts.directory, facts.config)
    audit = options.memorization(facts.directory) if callable(options.memorization) else options.memorization
    card = model_card(facts, license=license, title=title, audit=audit, threshold=threshold, evals=evals)
    out_dir.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    _write_folder(facts, out_dir, card)
    scan = scan_folder(out_dir, options.secret_literals)
    reasons = _scan_reasons(scan) + _audit_reasons(facts, audit, threshold)
    if license is None:
        reasons.append("the model card has no license: pass --license SPDX-ID (e.g. apache-2.0) or set "
                       "publish.license in the run's config")
    return Publication(out_dir, scan.files, reasons, license, card)


__all__ = ["ADAPTER_DIR", "CARD", "Publication", "PublishError", "PublishOptions", "PublishRefused",
           "check_license", "model_card", "prepare_publication"]
