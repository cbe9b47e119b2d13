"""Safe checkpoints: safetensors + JSON only, SHA-256 manifest verified on load, atomic writes."""
from bastion.checkpoint.checkpoint import (
    Checkpoint,
    Retention,
    list_checkpoints,
    load_checkpoint,
    prune,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

__all__ = ["Checkpoint", "Retention", "list_checkpoints", "load_checkpoint", "prune", "resolve_checkpoint", "save_checkpoint", "verify_checkpoint"]
