"""What a checkpoint says about its model, read in one place.

Beside its tensors a checkpoint folder holds config.yaml (the run's config, secrets
redacted), tokenizer.json and trainer_state.json (bastion/checkpoint/checkpoint.py). Every
command that needs to know which model a checkpoint is - loading it for inference, starting
a fine-tune from it, merging adapters into it, exporting it - asks this module:

    checkpoint_config(ckpt)        config.yaml as a validated BastionConfig (no ${VAR} expansion)
    checkpoint_model_config(ckpt)  its model section, vocab_size set
    adapters_only(config)          a LoRA run's checkpoint: adapters, no base weights
    refuse_head(...)               a reward model where a language model is needed, or the reverse
    checkpoint_tokenizer(ckpt)     tokenizer.json with the model's own bos / eos / pad, ids within the model
    checkpoint_chat(ckpt, tok)     the chat format the model was trained with
    chat_template(state)           that template's text (Bastion's built-in one if none recorded)
    tokenizer_state(state)         the keys that follow a model through every stage
    lora_base(ckpt)                the verified base checkpoint a LoRA run's adapters belong to
    stored_quantization(ckpt)      a quantized checkpoint's description of its weights, or None
    read_trainer_state(path)       trainer_state.json alone, verified (no tensor is read)
    manifest_sha256(path)          a checkpoint's identity: the SHA-256 of its MANIFEST.json

trainer_state.json keys beyond the run's progress (step, tokens_seen, sampler, ...):

    special_tokens   {"bos_token", "eos_token", "pad_token"} strings (imported models)
    chat_template    the template text (imported models; absent: Bastion's built-in)
    imported_from    the Hugging Face model_type a checkpoint was imported from
    init_from        {"path", "manifest_sha256"}: the checkpoint a fine-tune started from
    lora_base_manifest_sha256   a LoRA run: the MANIFEST.json hash of its base
    merged_lora      a merged checkpoint: the base's and the adapter's manifest hashes
    quantization     a quantized checkpoint (`bastion quantize`): mode and each quantized
                     weight's layout, checked by bastion/model/quantize.py before use
    quantized_from   a quantized checkpoint: {"path", "manifest_sha256"} of its source

The first three describe the tokenizer, not the run: fine-tuning copies them from the
checkpoint it starts from, so they follow a model through every stage.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from bastion.checkpoint.checkpoint import Checkpoint, load_checkpoint, read_checkpoint_file, resolve_checkpoint
from bastion.checkpoint.formats import MAX_JSON_BYTES, MAX_YAML_BYTES
from bastion.checkpoint.manifest import manifest_sha256 as _manifest_file_sha256
from bastion.checkpoint.safetensors_check import check_finite
from bastion.config.load import REDACTED, build_config, parse_yaml
from bastion.config.schema import BastionConfig, ModelConfig, TrainConfig
from bastion.errors import CheckpointError, ConfigError
from bastion.safeio import is_sha256, parse_json
from bastion.tokenizer import EOS_TOKEN, PAD_TOKEN, BastionTokenizer
from bastion.tokenizer.chat import DEFAULT_CHAT_TEMPLATE, ChatFormat

TOKENIZER_STATE_KEYS = ("special_tokens", "chat_template", "imported_from")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token")
BASTION_SPECIALS = {"bos_token": None, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN}
BASE_SHA_KEY = "lora_base_manifest_sha256"
QUANTIZATION_KEY = "quantization"
MAX_TRAINER_STATE_BYTES = MAX_JSON_BYTES
MAX_CONFIG_YAML_BYTES = MAX_YAML_BYTES


def manifest_sha256(path: str | Path) -> str:
    """SHA-256 of the MANIFEST.json of the checkpoint `path` names (anything
    `resolve_checkpoint` accepts): it pins every file's hash, so it identifies the exact
    checkpoint (adapters record their base by it)."""
    return _manifest_file_sha256(resolve_checkpoint(path))


def parse_trainer_state(data: bytes, where: str | Path) -> dict[str, Any]:
    """trainer_state.json's bytes as a dict (CheckpointError naming `where` otherwise)."""
    state = parse_json(data, CheckpointError, f"{where}")
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: not a JSON object")
    return state


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint, checked against its manifest; {} if it has none."""
    directory = resolve_checkpoint(path)
    data = read_checkpoint_file(directory, "trainer_state.json", MAX_TRAINER_STATE_BYTES)
    return {} if data is None else parse_trainer_state(data, directory / "trainer_state.json")


def checkpoint_config(ckpt: Checkpoint) -> BastionConfig:
    """The checkpoint's config.yaml, validated. Stored values are taken literally: a `${VAR}`
    in a checkpoint is text, never read from this machine's environment."""
    where = f"{ckpt.directory}/config.yaml"
    if len(ckpt.config_yaml) > MAX_CONFIG_YAML_BYTES:
        raise CheckpointError(f"{where}: over {MAX_CONFIG_YAML_BYTES} bytes")
    try:
        raw = parse_yaml(ckpt.config_yaml, where) or {}
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: not a mapping")
    return build_config(raw, source=where, interpolate_env=False)


def checkpoint_model_config(ckpt: Checkpoint) -> ModelConfig:
    """The model section of the checkpoint's config (vocab_size must be set)."""
    cfg = checkpoint_config(ckpt).model
    if cfg.vocab_size is None:
        raise CheckpointError(f"{ckpt.directory}/config.yaml: model.vocab_size is not set")
    return cfg


def adapters_only(config: BastionConfig) -> bool:
    """Whether a checkpoint with this config holds LoRA adapters and no base weights (what a
    LoRA run saves; merged and imported checkpoints record LoRA as disabled)."""
    return config.finetune.lora.enabled


def refuse_adapters_only(ckpt: Checkpoint, config: BastionConfig, what: str) -> None:
    """CheckpointError for a command that needs full weights (`what`: what the checkpoint was given as)."""
    if adapters_only(config):
        raise CheckpointError(f"{what} {ckpt.directory} holds LoRA adapters only, not a full model; fold them into "
                              "their base first with `bastion merge BASE RUN OUT` (or export the adapter with "
                              "`bastion export peft`)")


Head = Literal["lm", "score", "any"]


def refuse_head(ckpt: Checkpoint, config: BastionConfig, head: Head, what: str) -> None:
    """CheckpointError unless the checkpoint's model has the head the caller needs: "lm" (a
    language model: generation, serving, SFT/DPO, GGUF), "score" (a reward model,
    model.score_labels set), or "any" (export hf, which writes either)."""
    labels = config.model.score_labels
    if head == "lm" and labels is not None:
        raise CheckpointError(f"{what} {ckpt.directory} is a reward/scoring model (model.score_labels={labels}): it "
                              "has no lm head and cannot generate text; use it as a reward (`rewards: [{name: "
                              "reward_model, checkpoint: ...}]`), with `bastion eval preferences`, or `bastion export hf`")
    if head == "score" and labels is None:
        raise CheckpointError(f"{what} {ckpt.directory} is a language model, not a reward model or classifier (its "
                              "config has no model.score_labels); train one with train.objective: reward, classify "
                              "or regress")


def special_tokens(state: dict[str, Any]) -> dict[str, str | None]:
    """The bos / eos / pad token strings of a checkpoint's model: those recorded in
    trainer_state (imported models and their descendants; a key left unset is None), else
    Bastion's own (<|endoftext|> eos, <|pad|> pad, no bos)."""
    stored = state.get("special_tokens")
    if not isinstance(stored, dict):
        return dict(BASTION_SPECIALS)
    return {key: stored.get(key) if isinstance(stored.get(key), str) else None for key in SPECIAL_TOKEN_KEYS}


def tokenizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """The TOKENIZER_STATE_KEYS a trainer_state carries (to copy into a derived checkpoint)."""
    return {key: state[key] for key in TOKENIZER_STATE_KEYS if key in state}


def chat_template(state: dict[str, Any]) -> str:
    """The chat template a model was trained with: the one recorded (imported models and
    everything fine-tuned from them), else Bastion's built-in template."""
    template = state.get("chat_template")
    return template if isinstance(template, str) else DEFAULT_CHAT_TEMPLATE


def checkpoint_tokenizer(ckpt: Checkpoint) -> BastionTokenizer:
    """The checkpoint's tokenizer with its own eos / pad / bos (Bastion's when none recorded);
    refused unless every token id indexes the model's embedding (model.vocab_size)."""
    where = f"{ckpt.directory}/tokenizer.json"
    try:
        tokenizer = BastionTokenizer.from_json_str(ckpt.tokenizer_json, **special_tokens(ckpt.trainer_state))
    except CheckpointError:
        raise
    except Exception as exc:  # DataError from the wrapper; anything tokenizers raises on odd JSON
        raise CheckpointError(f"{where}: {exc}") from None
    vocab_size = checkpoint_model_config(ckpt).vocab_size
    if tokenizer.max_id >= vocab_size:
        raise CheckpointError(f"{where}: token id {tokenizer.max_id} is outside the model's vocab_size {vocab_size}")
    return tokenizer


def checkpoint_chat(ckpt: Checkpoint, tokenizer: BastionTokenizer) -> ChatFormat:
    """The chat format the model was trained with (its recorded template, else the built-in)."""
    template = ckpt.trainer_state.get("chat_template")
    return ChatFormat(tokenizer, template if isinstance(template, str) else None,
                      bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)


def model_name(directory: Path, config: BastionConfig) -> str:
    """A checkpoint's model name (GGUF general.name, the id `bastion serve` reports): the
    run's train.run_name when the run chose one (not the default, not a redacted secret) -
    the user's own label, the same wherever the checkpoint is copied - else the run folder's
    name (RUN for RUN/checkpoints/step_N, ROOT for ROOT/step_N)."""
    chosen = config.train.run_name
    if chosen != TrainConfig.model_fields["run_name"].default and REDACTED not in chosen:
        return chosen
    where = Path(directory).absolute()
    run_dir = where.parent.parent if where.parent.name == "checkpoints" else where.parent
    return run_dir.name or "bastion"


def lora_base(ckpt: Checkpoint) -> Path:
    """The base checkpoint of a LoRA run's checkpoint: the one recorded in trainer_state
    "init_from", refused unless it still exists and its MANIFEST.json hash is the one
    recorded at training time."""
    recorded = ckpt.trainer_state.get("init_from")
    base_path = recorded.get("path") if isinstance(recorded, dict) else None
    base_sha = ckpt.trainer_state.get(BASE_SHA_KEY)
    if not isinstance(base_path, str) or not is_sha256(base_sha):
        raise CheckpointError(f"{ckpt.directory}: LoRA checkpoint without a recorded base (trainer_state init_from "
                              f"and {BASE_SHA_KEY})")
    if not Path(base_path).exists():
        raise CheckpointError(f"{ckpt.directory}: holds LoRA adapters for the base {base_path}, which is gone; "
                              "merge them (`bastion merge BASE RUN OUT`) with the base wherever it is now")
    if manifest_sha256(base_path) != base_sha:
        raise CheckpointError(f"{ckpt.directory}: its base {base_path} has changed since training "
                              "(MANIFEST.json hash differs); refusing to apply the adapters to it")
    return resolve_checkpoint(base_path)


def stored_quantization(ckpt: Checkpoint) -> Any:
    """trainer_state "quantization" of a quantized checkpoint, as stored (unchecked: the
    reader that rebuilds the weights validates it against the model config), else None."""
    return ckpt.trainer_state.get(QUANTIZATION_KEY)


def refuse_quantized(ckpt: Checkpoint, what: str) -> None:
    """CheckpointError for a command that needs full-precision weights (training, merging,
    export) given a quantized checkpoint, naming the checkpoint it was made from."""
    stored = stored_quantization(ckpt)
    if stored is None:
        return
    mode = stored.get("mode") if isinstance(stored, dict) else None
    source = ckpt.trainer_state.get("quantized_from")
    origin = source.get("path") if isinstance(source, dict) else None
    where = f" ({str(origin)[:200]})" if isinstance(origin, str) else ""
    raise CheckpointError(f"{what} {ckpt.directory} is a quantized checkpoint ({str(mode)[:20]} weights, made by "
                          "`bastion quantize`): it is for inference only (generate, eval, serve); train, merge and "
                          f"export from the full-precision checkpoint it was made from{where}")


def refuse_nonfinite(ckpt: Checkpoint, config: BastionConfig, requested: bool = False) -> None:
    """NaN / Inf weights are an error when the caller asks (`requested`) or the checkpoint's
    own config does (checkpoint.reject_nonfinite)."""
    if requested or config.checkpoint.reject_nonfinite:
        check_finite(ckpt.model, ckpt.directory)


def load_full_model(path: str | Path, *, what: str = "checkpoint", verify: bool = True,
                    reject_nonfinite: bool = False, head: Head = "lm") -> tuple[Checkpoint, BastionConfig]:
    """A verified checkpoint that holds a whole model (no optimizer state loaded) and its
    config; a LoRA run's adapters-only checkpoint is refused with the way out, a quantized
    one (`refuse_quantized`: full-precision weights are needed) too, a model
    without the `head` the caller needs (`refuse_head`: language models by default) too,
    and NaN / Inf weights as `refuse_nonfinite` says (exporters always ask: an exported
    model leaves Bastion's checks behind)."""
    ckpt = load_checkpoint(path, verify=verify, load_optimizer=False)
    config = checkpoint_config(ckpt)
    refuse_adapters_only(ckpt, config, what)
    refuse_quantized(ckpt, what)
    refuse_head(ckpt, config, head, what)
    checkpoint_model_config(ckpt)  # vocab_size must be known to build it
    refuse_nonfinite(ckpt, config, reject_nonfinite)
    return ckpt, config


__all__ = ["BASE_SHA_KEY", "QUANTIZATION_KEY", "TOKENIZER_STATE_KEYS", "adapters_only", "chat_template", "checkpoint_chat",
           "checkpoint_config", "checkpoint_tokenizer", "load_full_model", "lora_base", "manifest_sha256",
           "checkpoint_model_config", "model_name", "parse_trainer_state", "read_trainer_state", "refuse_adapters_only", "refuse_head", "refuse_nonfinite", "refuse_quantized", "special_tokens",
           "stored_quantization",
           "tokenizer_state"]
