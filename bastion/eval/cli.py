"""`bastion eval ...`: evaluations of trained checkpoints."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bastion.checkpoint.cli import RequireSignatureOption, TrustedKeyOption, use_signature_options
from bastion.eval.perplexity import DEFAULT_FORMATS
from bastion.infer.cli import Quantization, QuantizeOption, quantize_value


app = typer.Typer(help="Evaluate trained checkpoints: held-out loss, preference accuracy, classifier metrics, "
                       "generation rewards, "
                       "memorization audits.", no_args_is_help=True)
out = Console(markup=False)  # paths and names are printed as they are, never read as markup
err = Console(stderr=True)


@app.command("memorization")
def memorization_cmd(
    checkpoint: Path = typer.Option(..., "--checkpoint",
                                    help="Checkpoint folder, or a run/checkpoints folder (uses 'latest')."),
    canaries: Path = typer.Option(..., "--canaries", help="Records file written by `bastion data canaries`."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here (mode 0600)."),
    candidates: int = typer.Option(10_000, "--candidates", min=100, max=10_000_000,
                                   help="Sample size for estimated ranks (candidate spaces above --exact-limit)."),
    exact_limit: int = typer.Option(10_000, "--exact-limit", min=1, max=10_000_000,
                                    help="Score every candidate when there are at most this many."),
    seed: int = typer.Option(0, "--seed", help="Seed of the candidate sample (estimated ranks)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or mps."),
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Exposure of each canary (The Secret Sharer): log2|R| - log2 rank of the true secret among all candidates."""
    use_signature_options(require_signature, trusted_keys)
    from bastion.eval.memorization import audit_memorization
    from bastion.safeio import replace_file

    report = audit_memorization(checkpoint, canaries, sample_size=candidates, exact_limit=exact_limit,
                                seed=seed, device=device)
    table = Table(title=f"memorization: {report.checkpoint}")
    for column in ("canary", "repeats", "rank", "exposure", "max exposure", "greedy hit"):
        table.add_column(column, justify="left" if column == "canary" else "right")
    for r in report.results:
        # Estimated ranks say so; "beyond resolution" means no sampled candidate beat the secret.
        rank = f"{r.rank:,.0f}" if r.rank_exact else f"{'≤' if r.beyond_resolution else '~'}{r.rank:,.0f}"
        expo = f"{'≥' if r.beyond_resolution else ''}{r.exposure:.2f}"
        table.add_row(r.id, str(r.repeats), rank, expo, f"{r.max_exposure:.2f}", "yes" if r.greedy_hit else "no")
    out.print(table)
    estimated = [r for r in report.results if not r.rank_exact]
    if estimated:
        out.print(f"~ ranks estimated from {estimated[0].sample_size:,} sampled candidates (exact up to "
                  f"{exact_limit:,}); ≤/≥: no sampled candidate beat the secret, the sample's resolution limit")
    for repeats, mean in report.by_repeats().items():
        out.print(f"repeats {repeats}: mean exposure {mean:.2f}")
    if json_out is not None:
        try:
            replace_file(json_out, (json.dumps(report.to_dict(), indent=2) + "\n").encode())
        except OSError as exc:
            err.print(f"[bold red]error:[/] cannot write {escape(str(json_out))}: {exc.strerror}", highlight=False)
            raise typer.Exit(2) from None
        out.print(f"wrote {json_out}")


CheckpointArg = typer.Option(..., "--checkpoint", help="Checkpoint folder, or a run/checkpoints folder (uses 'latest').")
RootOption = typer.Option(None, "--root", help="Folder the file may be read from (repeatable; default: the current folder).")
DeviceOption = typer.Option("cpu", "--device", help="cpu, cuda or mps.")


def _table(title: str, values: dict) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in values.items():
        table.add_row(name, f"{value:,.0f}" if float(value).is_integer() and abs(value) >= 1 else f"{value:.4f}")
    out.print(table)


def _write_json(path: Optional[Path], data: dict) -> None:
    if path is None:
        return
    from bastion.safeio import replace_file

    replace_file(path, (json.dumps(data, indent=2) + "\n").encode())
    out.print(f"wrote {path}")


@app.command("loss")
def loss_cmd(
    checkpoint: Path = CheckpointArg,
    file: Path = typer.Option(..., "--file", help="Held-out chat JSONL ({\"messages\": [...]} per line)."),
    roots: Optional[List[str]] = RootOption,
    batch_size: int = typer.Option(8, "--batch-size", min=1, max=1024, help="Examples per forward pass."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=8, help="Longest example kept (default: the model's context)."),
    device: str = DeviceOption,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here (mode 0600)."),
    quantize: Optional[Quantization] = QuantizeOption,
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Loss on assistant tokens and perplexity of held-out conversations."""
    use_signature_options(require_signature, trusted_keys)
    from bastion.eval.finetune import eval_loss

    result = eval_loss(checkpoint, file, roots=roots or ["."], batch_size=batch_size, seq_len=seq_len, device=device,
                       quantize=quantize_value(quantize))
    _table(f"held-out loss: {file}", result)
    _write_json(json_out, result)


@app.command("perplexity")
def perplexity_cmd(
    checkpoint: Path = CheckpointArg,
    text: Optional[Path] = typer.Option(None, "--text", help="Held-out plain text (UTF-8), tokenized with the "
                                        "checkpoint's tokenizer."),
    data: Optional[Path] = typer.Option(None, "--data", help="Or a token-shard folder from `bastion data prepare` "
                                        "(made with the checkpoint's tokenizer)."),
    split: str = typer.Option("val", "--split", help="Split of --data to read."),
    formats: str = typer.Option(",".join(DEFAULT_FORMATS), "--formats",
                                help="Comma-separated formats to compare, the first the baseline: fp32, bf16, int8, "
                                     "int4 (Bastion's --quantize), gguf-f16, gguf-q8_0, gguf-q4_0 (the values a "
                                     "`bastion export gguf --dtype ...` file stores)."),
    roots: Optional[List[str]] = RootOption,
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="Window length (default: the model's context)."),
    max_tokens: int = typer.Option(65_536, "--max-tokens", min=2, max=100_000_000, help="Evaluate the first N tokens."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, max=1024, help="Windows per forward pass."),
    device: str = DeviceOption,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here (mode 0600)."),
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Perplexity on held-out text in full precision and each quantized format, side by side:
    what int8 / int4 / GGUF q8_0 / q4_0 give up on your data."""
    use_signature_options(require_signature, trusted_keys)
    from bastion.eval.perplexity import eval_perplexity

    result = eval_perplexity(checkpoint, text=text, data=data, split=split, formats=formats.split(","),
                             roots=roots or ["."], seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size,
                             device=device)
    table = Table(title=f"perplexity: {result['tokens']:,} tokens, windows of {result['seq_len']}")
    for column in ("format", "perplexity", f"change vs {result['baseline']}", "nll (nats)", "seconds"):
        table.add_column(column, justify="left" if column == "format" else "right")
    for name, row in result["formats"].items():
        table.add_row(name, f"{row['perplexity']:.4f}", f"{row['change_pct']:+.2f}%", f"{row['nll']:.5f}",
                      f"{row['seconds']:.1f}")
    out.print(table)
    _write_json(json_out, result)


@app.command("preferences")
def preferences_cmd(
    checkpoint: Path = CheckpointArg,
    file: Path = typer.Option(..., "--file", help="Held-out preference JSONL (prompt / chosen / rejected)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="Reference checkpoint (the model before DPO): "
                                             "DPO rewards. Without it: SimPO's reference-free rewards."),
    beta: Optional[float] = typer.Option(None, "--beta", min=1e-6, max=100, help="Reward scale (default: the checkpoint's finetune.preference.beta)."),
    roots: Optional[List[str]] = RootOption,
    batch_size: int = typer.Option(8, "--batch-size", min=1, max=1024, help="Pairs per forward pass."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=8, help="Longest pair kept (default: the model's context)."),
    device: str = DeviceOption,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here (mode 0600)."),
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Reward accuracy (how often chosen beats rejected), margins and loss on held-out pairs; a reward model
    (train.objective reward) is judged by its own scores."""
    use_signature_options(require_signature, trusted_keys)
    from bastion.eval.finetune import eval_preferences

    result = eval_preferences(checkpoint, file, reference=reference, roots=roots or ["."], beta=beta,
                              batch_size=batch_size, seq_len=seq_len, device=device)
    kind = "reward model" if "beta" not in result else "DPO rewards" if reference else "SimPO rewards"
    _table(f"preferences: {file} ({kind})", result)
    _write_json(json_out, result)


WithoutOption = typer.Option(None, "--without", help="A model with modality streams: leave this modality out for "
                             "every example (repeatable), to measure what the model loses without it.")


@app.command("classify")
def classify_cmd(
    checkpoint: Path = CheckpointArg,
    file: Path = typer.Option(..., "--file", "--data", help="Labelled JSONL: {\"text\": ..., \"label\": ...} per "
                              "line (a class name or index for a classifier, a number for a regressor)."),
    roots: Optional[List[str]] = RootOption,
    batch_size: int = typer.Option(8, "--batch-size", min=1, max=1024, help="Texts per forward pass."),
    device: str = DeviceOption,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here (mode 0600)."),
    without: Optional[List[str]] = WithoutOption,
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Metrics of a classify / regress checkpoint on held-out labelled texts: accuracy and macro-F1, or MAE,
    Pearson r, Acc-2 (negative vs non-negative; negative vs positive without zero labels) and Acc-7. A model
    with modality streams reads <file stem>.<modality>.safetensors beside the file (docs/multimodal.md)."""
    use_signature_options(require_signature, trusted_keys)
    from bastion.eval.classify import eval_labels

    result = eval_labels(checkpoint, file, roots=roots or ["."], batch_size=batch_size, device=device,
                         without=without or ())
    _table(f"labels: {file}", result)
    _write_json(json_out, result)


def predict_cmd(
    checkpoint: Path = CheckpointArg,
    file: Optional[Path] = typer.Option(None, "--file", "--data", help="JSONL of {\"text\": ...} per line (a "
                                        "\"label\" is allowed and ignored)."),
    texts: Optional[List[str]] = typer.Option(None, "--text", help="A text to label (repeatable, at most 1024); "
                                              "instead of --file."),
    roots: Optional[List[str]] = RootOption,
    batch_size: int = typer.Option(8, "--batch-size", min=1, max=1024, help="Texts per forward pass."),
    device: str = DeviceOption,
    without: Optional[List[str]] = WithoutOption,
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Label new texts with a classify / regress checkpoint: one JSON line per text, in order - the record's
    "id" if it has one, the class and every class's probability, or the value. A model with modality streams
    reads <file stem>.<modality>.safetensors beside --file; --text values have no streams (every modality missing)."""
    use_signature_options(require_signature, trusted_keys)
    from bastion.eval.classify import predict_labels

    lines = [json.dumps(p, ensure_ascii=False) for p in predict_labels(
        checkpoint, file=file, texts=texts or (), roots=roots or ["."], batch_size=batch_size, device=device,
        without=without or ())]
    for line in lines:  # printed once all are computed: a failure prints nothing
        print(line)


@app.command("generate")
def generate_cmd(
    checkpoint: Path = CheckpointArg,
    file: Path = typer.Option(..., "--file", help="Prompts JSONL: {\"messages\": [...]} or {\"prompt\": \"...\"}, plus "
                                                 "the fields its rewards read (\"answer\", \"schema\", ...)."),
    rewards: Optional[List[str]] = typer.Option(None, "--reward", help="A reward of weight 1 (repeatable): NAME (a "
                                                "reward without required parameters: exact, contains, math, ...) | "
                                                "regex:PATTERN | length:MIN-MAX. See `bastion eval rewards`."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config whose rewards: list (names, "
                                          "weights, parameters) is added to the --reward ones; nothing else in it is used."),
    roots: Optional[List[str]] = RootOption,
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Per completion (default and ceiling: the checkpoint's generate section)."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, max=100.0, help="0 = greedy (reproducible)."),
    samples: int = typer.Option(1, "--samples", min=1, max=1024, help="Completions per prompt (K > 1 needs "
                                "--temperature > 0); reports pass@k for k = 1, powers of 2 and K."),
    pass_threshold: float = typer.Option(1.0, "--pass-threshold", min=-1e6, max=1e6, help="A completion passes "
                                         "(for pass@k) when its total reward is at least this."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed: sample j of prompt i uses seed + i * samples + j."),
    max_prompts: int = typer.Option(10_000, "--max-prompts", min=1, max=1_000_000, help="Read at most this many prompts."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, max=256, help="Prompts decoded together (the result "
                                   "does not depend on it; more is faster until memory runs out)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=1024, help="CPU threads for decoding "
                                          "(default: torch's; 1 is often fastest for small models on few cores)."),
    device: str = DeviceOption,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results as JSON here (mode 0600)."),
    quantize: Optional[Quantization] = QuantizeOption,
    require_signature: bool = RequireSignatureOption,
    trusted_keys: Optional[List[Path]] = TrustedKeyOption,
) -> None:
    """Generate completions per prompt and score them with the weighted sum of rewards (and pass@k)."""
    use_signature_options(require_signature, trusted_keys)
    from bastion.eval.finetune import eval_generate

    specs = _reward_specs(rewards or [], config)
    result = eval_generate(checkpoint, file, specs, roots=roots or ["."], max_new_tokens=max_new_tokens,
                           temperature=temperature, seed=seed, max_prompts=max_prompts, device=device,
                           batch_size=batch_size, threads=threads, samples=samples, pass_threshold=pass_threshold,
                           quantize=quantize_value(quantize))
    per = f" x {result.samples_per_prompt} samples" if result.samples_per_prompt > 1 else ""
    _table(f"generation rewards over {result.n} prompts{per}: {file}",
           result.mean | {f"pass@{k}": v for k, v in result.pass_at_k.items()})
    for sample in result.samples:
        out.print(repr(sample["completion"]), highlight=False)
    _write_json(json_out, {"prompts": result.n, "samples_per_prompt": result.samples_per_prompt, "mean": result.mean,
                           "pass_threshold": pass_threshold,
                           "pass_at_k": {str(k): v for k, v in result.pass_at_k.items()}, "samples": result.samples})


def _reward_specs(rewards: List[str], config: Optional[Path]) -> list[dict]:
    """The --reward specs, then the config's rewards: entries."""
    from bastion.errors import ConfigError
    from bastion.rewards import parse_reward_spec

    specs = [parse_reward_spec(spec) for spec in rewards]
    if config is not None:
        from bastion.config.load import load_config

        specs += [spec.as_mapping() for spec in load_config(config).rewards]
    if not specs:
        raise ConfigError("name a reward with --reward, or give a config (-c) with a rewards: list")
    return specs


@app.command("rewards")
def rewards_cmd() -> None:
    """List every reward a config or --reward can name: built in, or from installed packages' entry points."""
    from bastion.errors import ConfigError
    from bastion.rewards import REWARDS, entry_point_names, reward_class
    from bastion.rewards.specs import describe_params, summary

    table = Table(title="rewards")
    for column in ("name", "description", "parameters (type = default)"):
        table.add_column(column)
    for name in sorted(set(REWARDS) | set(entry_point_names())):
        try:
            cls = reward_class(name)
        except ConfigError as exc:  # a broken third-party package: listed, with why
            table.add_row(name, f"(cannot load: {exc})", "")
            continue
        params = "\n".join(f"{p}: {t} = {d}" for p, t, d in describe_params(cls))
        source = "" if cls.__module__.startswith("bastion.") else f" [{cls.__module__}]"
        table.add_row(name, summary(cls) + source, params)
    out.print(table)
