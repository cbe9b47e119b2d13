"""A tiny language model trained briefly on the synthetic agreement grammar, saved as a
Bastion checkpoint: real (non-random) weights for tests that measure what quantization or
an evaluation does to a model (~8 s on one thread)."""
from pathlib import Path

import torch

from bastion.checkpoint import Checkpoint, save_checkpoint
from bastion.config import build_config
from bastion.config.load import to_yaml
from bastion.model import Transformer
from bastion.tokenizer import BastionTokenizer
from synthetic.corpus import grammar_documents


def train_grammar_checkpoint(run_dir: Path, steps: int = 200) -> Path:
    """A 2-layer d_model 64 model trained for `steps` AdamW steps (loss ~0.9 after 200);
    returns the checkpoint directory under `run_dir`."""
    torch.set_num_threads(1)
    docs = grammar_documents(600, seed=0)
    tok = BastionTokenizer.train(docs, vocab_size=300, min_frequency=1)
    data = torch.tensor([i for d in docs for i in tok.encode(d) + [tok.eos_id]])
    cfg = build_config({"model": {"vocab_size": tok.vocab_size, "d_model": 64, "n_layer": 2, "n_head": 4,
                                  "n_kv_head": 2, "max_seq_len": 128, "dropout": 0.0}, "train": {"seq_len": 64}})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.stack([data[s:s + 65] for s in torch.randint(0, len(data) - 65, (16,), generator=g)])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 1.5
    ckpt = Checkpoint(model=model.state_dict(), trainer_state={"step": steps}, config_yaml=to_yaml(cfg),
                      tokenizer_json=tok.to_json_str())
    return save_checkpoint(run_dir, steps, ckpt)
