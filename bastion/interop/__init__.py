"""Other tools' formats in and out: import Hugging Face Llama / Mistral / Qwen2 folders;
export checkpoints as Hugging Face folders (transformers), GGUF files (llama.cpp) and LoRA
adapters as PEFT folders. Bastion's own formats are bastion/checkpoint and bastion/adapters."""
from bastion.interop.hf import export_hf, import_hf

__all__ = ["export_gguf", "export_hf", "export_peft", "import_hf"]


def __getattr__(name: str):
    # gguf and peft are imported only when their export is used.
    if name == "export_gguf":
        from bastion.interop.gguf import export_gguf

        return export_gguf
    if name == "export_peft":
        from bastion.interop.peft import export_peft

        return export_peft
    raise AttributeError(name)
