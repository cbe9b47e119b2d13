"""LoRA adapters as files: adapter folders (save, verify, load onto a model) and merging
adapters into their base checkpoint. The LoRA layers themselves are in bastion/model/lora.py."""
from bastion.adapters.folder import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    Adapter,
    load_adapter,
    load_lora_state_dict,
    read_adapter,
    save_adapter,
)
from bastion.adapters.merge import merge_checkpoint

__all__ = ["ADAPTER_CONFIG", "ADAPTER_FILE", "Adapter", "load_adapter", "load_lora_state_dict", "merge_checkpoint",
           "read_adapter", "save_adapter"]
