"""Interoperability: import Hugging Face Llama / Mistral / Qwen2 folders, export checkpoints
as Hugging Face folders or llama.cpp GGUF files."""
from bastion.export.hf import (
    export_hf,
    import_hf,
    read_chat_template,
    read_special_tokens,
)

__all__ = ["export_gguf", "export_hf", "import_hf", "read_chat_template", "read_special_tokens"]


def __getattr__(name: str):
    # gguf is an optional dependency: import it only when GGUF export is used.
    if name == "export_gguf":
        from bastion.export.gguf import export_gguf

        return export_gguf
    raise AttributeError(name)
