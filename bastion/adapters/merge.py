"""`bastion merge`: fold LoRA adapters into their base and write a normal Bastion checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from bastion.adapters.folder import ADAPTER_CONFIG, ADAPTER_FILE, Adapter, attach, check_base, check_sha, read_adapter
from bastion.checkpoint.checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint
from bastion.checkpoint.contents import (
    BASE_SHA_KEY,
    adapters_only,
    checkpoint_config,
    load_full_model,
    manifest_sha256,
    tokenizer_state,
)
from bastion.config.load import to_yaml
from bastion.config.schema import BastionConfig
from bastion.errors import CheckpointError
from bastion.model.heads import base_weights_for
from bastion.model.lora import is_lora_state_name, merge_lora
from bastion.model.transformer import Transformer


def _training_adapter(path: Path, base_sha: str,
                      base_state: dict[str, torch.Tensor]) -> tuple[BastionConfig, dict[str, torch.Tensor], Path, str]:
    """(run config, adapter tensors, checkpoint dir, its manifest hash) of a LoRA training
    checkpoint: its model tensors are the LoRA ones (with a classify / regress run's score
    head), plus optionally the (frozen) base weights, which must then equal the base's. The
    run must have recorded its base (trainer_state[BASE_SHA_KEY]), unless those full base
    weights prove it."""
    directory = resolve_checkpoint(path)
    own_sha = manifest_sha256(directory)
    ckpt = load_checkpoint(directory, load_optimizer=False)
    config = checkpoint_config(ckpt)
    if not adapters_only(config):
        raise CheckpointError(f"{directory}: not a LoRA run (finetune.lora.enabled is false in its config.yaml)")
    tensors = {k: v for k, v in ckpt.model.items() if is_lora_state_name(k)}
    others = {k: v for k, v in ckpt.model.items() if not is_lora_state_name(k)}
    recorded = ckpt.trainer_state.get(BASE_SHA_KEY)
    if recorded is not None:
        check_base(check_sha(recorded, f"{directory}/trainer_state.json: {BASE_SHA_KEY}"), base_sha, directory)
    elif not others:
        raise CheckpointError(f"{directory}: does not record which base checkpoint it was trained on "
                              f"(trainer_state {BASE_SHA_KEY}); refusing to merge it")
    if others:
        frozen = {k: v for k, v in base_state.items() if not is_lora_state_name(k)}
        same = set(others) == set(frozen) and all(
            others[k].shape == frozen[k].shape and torch.equal(others[k].to(frozen[k].dtype), frozen[k])
            for k in others)
        if not same:
            raise CheckpointError(f"{directory}: its base weights differ from the base checkpoint's "
                                  "(a different base, or base weights that were not frozen)")
    return config, tensors, directory, own_sha


def _refuse_scoring_folder(loaded: Adapter) -> None:
    """A classify / regress adapter folder does not hold its run's config.yaml (train_file,
    labels, settings), which the merged classifier's checkpoint needs; the run's checkpoint does."""
    if loaded.head is not None:
        raise CheckpointError(f"{loaded.directory}: is the adapter folder of a train.objective "
                              f"{loaded.head.objective} run; merge that run's checkpoint instead "
                              "(`bastion merge BASE RUN_DIR OUT`), whose config.yaml the merged model keeps")


def merge_checkpoint(base_ckpt: str | Path, adapter: str | Path, out_dir: str | Path) -> Path:
    """Fold an adapter into its base and write a normal Bastion checkpoint (step 0) under
    out_dir: merged weights in the base's dtypes, the base's config.yaml with LoRA disabled,
    its tokenizer, chat template and special tokens. `adapter` is an adapter folder
    (`save_adapter`) or a LoRA training checkpoint / run dir. A classify / regress run (its
    checkpoint, not its adapter folder) merges into a classifier: the base's lm head gives way
    to the run's trained score head, and the config.yaml is the run's with LoRA disabled.
    Refuses an adapter trained on another base and a non-empty out_dir. Returns the
    checkpoint directory."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or (out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir()))):
        raise CheckpointError(f"output {out_dir} already exists and is not an empty folder; choose a new one")
    base_dir = resolve_checkpoint(base_ckpt)
    base_sha = manifest_sha256(base_dir)
    base, base_config = load_full_model(base_dir, what="base checkpoint", head="any")
    config = base_config

    adapter_path = Path(adapter)
    if (adapter_path / ADAPTER_CONFIG).exists():
        loaded = read_adapter(adapter_path)
        check_base(loaded.base_manifest_sha256, base_sha, loaded.directory)
        _refuse_scoring_folder(loaded)
        lora, tensors, adapter_sha = loaded.config, loaded.tensors, loaded.manifest_sha256
        where = loaded.directory / ADAPTER_FILE
    else:
        run_config, tensors, where, adapter_sha = _training_adapter(adapter_path, base_sha, base.model)
        lora = run_config.finetune.lora
        if run_config.model.score_labels is not None:
            config = run_config  # a classifier: the run's head, objective and label names
    # Assigned, not copied (one copy of the weights in memory); the merge is done in float32.
    weights = base_weights_for(base.model, base_config.model, config.model.score_labels)
    try:
        model = Transformer.from_state_dict(config.model, weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{base_dir}: weights do not match its config.yaml ({str(exc)[:300]})") from None
    if manifest_sha256(base_dir) != base_sha:
        raise CheckpointError(f"{base_dir}: MANIFEST.json changed while merging")
    attach(model, lora, tensors, where)
    merge_lora(model)

    state = {k: v.detach().to(weights[k].dtype) for k, v in model.state_dict().items()}
    config.finetune.lora.enabled = False
    trainer_state = {**tokenizer_state(base.trainer_state), "step": 0,
                     "merged_lora": {"base_manifest_sha256": base_sha, "adapter_manifest_sha256": adapter_sha}}
    merged = Checkpoint(model=state, trainer_state=trainer_state, config_yaml=to_yaml(config),
                        tokenizer_json=base.tokenizer_json)
    return save_checkpoint(out_dir, 0, merged)


__all__ = ["merge_checkpoint"]
