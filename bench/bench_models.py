"""The model both sides of a bench comparison load: a random Bastion checkpoint with a BPE
tokenizer trained on the bench's texts and Bastion's chat template, exported with
`bastion export hf` so transformers / peft / TRL read exactly the same weights and ids;
and `NoEos`, a tokenizer wrapper that makes every request run to its token budget
(decode-speed benches)."""
from __future__ import annotations

from pathlib import Path


def random_model_both_sides(work: Path, texts: list[str], *, vocab: int, d_model: int, layers: int, heads: int,
                            **model: object) -> None:
    """work/base (the Bastion checkpoint) and work/hf (its Hugging Face export)."""
    import torch

    from bastion.checkpoint import Checkpoint, save_checkpoint
    from bastion.config import build_config
    from bastion.config.load import to_yaml
    from bastion.interop.hf import export_hf
    from bastion.model import Transformer
    from bastion.tokenizer import BastionTokenizer
    from bastion.tokenizer.chat import DEFAULT_CHAT_TEMPLATE

    tok = BastionTokenizer.train(texts, vocab_size=vocab, min_frequency=1)
    cfg = build_config({"model": {"vocab_size": tok.vocab_size, "d_model": d_model, "n_layer": layers,
                                  "n_head": heads, "n_kv_head": heads, "max_seq_len": 256, "tie_embeddings": False,
                                  **model},
                        "train": {"seq_len": 128}})
    torch.manual_seed(0)
    # The chat template is stored with the model so the HF tokenizer renders exactly what Bastion does.
    ckpt = Checkpoint(model=Transformer(cfg.model).state_dict(), config_yaml=to_yaml(cfg), tokenizer_json=tok.to_json_str(),
                      trainer_state={"step": 0, "chat_template": DEFAULT_CHAT_TEMPLATE,
                                     "special_tokens": {"bos_token": None, "eos_token": "<|endoftext|>",
                                                        "pad_token": "<|pad|>"}})
    save_checkpoint(work / "base", 0, ckpt)
    export_hf(work / "base", work / "hf")


class NoEos:
    """The tokenizer without an end-of-text id: every request runs to its token budget."""

    eos_id = None

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)
