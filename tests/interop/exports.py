"""Helpers for the export tests: tiny checkpoints as training or `import hf` save them, and
the two kinds of byte-level BPE tokenizer an export meets - Bastion's own (GPT-2 split) and
Qwen2's (its own split regex, what transformers' Qwen2Tokenizer rebuilds)."""
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from bastion.checkpoint import Checkpoint, save_checkpoint
from bastion.config import build_config, to_yaml
from bastion.interop.hf import QWEN2_SPLIT_REGEX
from bastion.model import Transformer
from bastion.tokenizer import BastionTokenizer

# Digit runs, whitespace runs, indentation and chat markers, so that the vocabulary has the
# merges where GPT-2's and Qwen2's splits (and template/content boundaries) differ.
TEXT = [
    "the quick brown fox jumps over the lazy dog in 2024, 12345 times",
    "def f(x):\n    return x  # two  spaces\n\n\n  indented\ttabs\t\there",
    "<|im_start|>user\nhello world<|endoftext|>\n<|im_start|>assistant\n  hi there, ünïcödé été ☃",
    "1 + 2 = 3; 4 * 5 = 20; 100 / 4 = 25; 2024-01-01 it's they'll we've",
] * 40
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def bastion_tokenizer(vocab_size: int = 420) -> BastionTokenizer:
    return BastionTokenizer.train(TEXT, vocab_size=vocab_size)


def qwen_style_tokenizer(vocab_size: int = 420, eos: str = "<|endoftext|>", pad: str | None = None) -> BastionTokenizer:
    """A Qwen2-style tokenizer (NFC, Qwen2's split regex, byte-level BPE) with ChatML specials."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(QWEN_SPECIALS),
                                                       show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return BastionTokenizer(tok, eos_token=eos, pad_token=pad)


def make_checkpoint(root, tokenizer: BastionTokenizer, seed: int = 0, *, trainer_state=None, sections=None, **model):
    """A random checkpoint (norms and biases randomised too) as training would save it;
    `sections`: other config sections (train, generate); `trainer_state`: extra keys, e.g.
    what `import hf` records (imported_from, special_tokens, chat_template)."""
    torch.manual_seed(seed)
    settings = {"vocab_size": tokenizer.vocab_size, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64,
                "d_ff": 96, "max_seq_len": 64, **model}
    config = build_config({"train": {"seq_len": 64}, **(sections or {}), "model": settings})
    net = Transformer(config.model)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    ckpt = Checkpoint(model=net.state_dict(), trainer_state={"step": 7, **(trainer_state or {})},
                      config_yaml=to_yaml(config), tokenizer_json=tokenizer.to_json_str())
    return save_checkpoint(root, 7, ckpt), net.eval()


def imported_state(tokenizer: BastionTokenizer, **extra):
    """The trainer_state keys `import hf` records for a Qwen2 folder with this tokenizer."""
    specials = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token}
    return {"imported_from": "qwen2", "special_tokens": specials, **extra}
