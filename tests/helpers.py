"""Helpers shared by tests (import as `from helpers import ...`)."""
from bastion.config import build_config


def tiny_config(data_dir, out_dir, **train):
    settings = {"data_dir": str(data_dir), "out_dir": str(out_dir), "seq_len": 64, "batch_size": 8,
                "max_steps": 40, "lr": 3e-3, "warmup_steps": 5, "eval_every": 20, "eval_batches": 2,
                "log_every": 1, "seed": 7, "threads": 1}
    settings.update(train)
    return build_config({"model": {"preset": "tiny", "dropout": 0.1}, "train": settings,
                         "checkpoint": {"every_steps": 15, "keep_last": 2}})


def make_base_checkpoint(root, *, texts=None, vocab_size=320, seed=0, **model):
    """A randomly initialised Bastion checkpoint with a freshly trained byte-level BPE
    tokenizer: the start point of fine-tuning tests (nothing downloaded). Returns its dir."""
    import torch

    from bastion.checkpoint import Checkpoint, save_checkpoint
    from bastion.config.load import to_yaml
    from bastion.model import Transformer
    from bastion.tokenizer import BastionTokenizer

    texts = texts or ["reverse: a b c d e f g h i j", "greet kalomi Hello, Nice to meet you! go away whatever"] * 50
    tok = BastionTokenizer.train(texts, vocab_size=vocab_size, min_frequency=1)
    shape = {"d_model": 64, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "max_seq_len": 128, **model}
    cfg = build_config({"model": {**shape, "vocab_size": tok.vocab_size}, "train": {"seq_len": 64}})
    torch.manual_seed(seed)
    net = Transformer(cfg.model)
    ckpt = Checkpoint(model=net.state_dict(), trainer_state={"step": 0}, config_yaml=to_yaml(cfg),
                      tokenizer_json=tok.to_json_str())
    return save_checkpoint(root, 0, ckpt)


def finetune_config(init_from, train_file, out_dir, *, objective="sft", val_file=None, lora=None, preference=None,
                    sequence=None, roots=("/",), **train):
    settings = {"objective": objective, "out_dir": str(out_dir), "seq_len": 128, "batch_size": 16,
                "max_steps": 100, "lr": 3e-3, "warmup_steps": 10, "eval_every": 50, "eval_batches": 4,
                "log_every": 10, "seed": 3, "threads": 2, "weight_decay": 0.0, "device": "cpu"}
    settings.update(train)
    finetune = {"init_from": str(init_from), "train_file": str(train_file), "max_length": settings["seq_len"]}
    if val_file is not None:
        finetune["val_file"] = str(val_file)
    if lora is not None:
        finetune["lora"] = {"enabled": True, **lora}
    if preference is not None:
        finetune["preference"] = preference
    if sequence is not None:  # classify / regress: finetune.sequence (labels, label_range, regress_loss)
        finetune["sequence"] = sequence
    return build_config({"train": settings, "finetune": finetune, "data": {"allowed_roots": list(roots)},
                         "checkpoint": {"every_steps": 1000, "keep_last": 2}})


# ---- LoRA tests (tests/model/test_lora.py, tests/adapters/) ------------------------------

LORA_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def lora_test_config(**model):
    settings = {"vocab_size": 97, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 32, "d_ff": 48,
                "max_seq_len": 32, "dropout": 0.0, **model}
    return build_config({"model": settings, "train": {"seq_len": 32}})


def lora_test_model(seed=0, **model):
    import torch

    from bastion.model import Transformer

    torch.manual_seed(seed)
    return Transformer(lora_test_config(**model).model)


def randomize_adapters(model, seed=1):
    import torch

    from bastion.model.lora import lora_state_dict

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def lora_test_ids(seed=3, T=16):
    import torch

    return torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(seed))


def make_adapter_folder(base_dir, out_dir, *, rank=4, alpha=8.0, targets=("wq", "wv", "w2"), seed=1, scale=0.3,
                        base_sha=None, **model):
    """A LoRA adapter folder for the checkpoint `base_dir` (random adapters of size `scale`,
    enough to change a tiny model's greedy text), recording `base_sha` (default: the base's
    own manifest hash). `model` overrides the base's shape: an adapter that does not fit."""
    import torch

    from bastion.adapters import save_adapter
    from bastion.checkpoint.contents import manifest_sha256
    from bastion.config.schema import LoraConfig
    from bastion.infer.loading import load_for_inference
    from bastion.model import Transformer
    from bastion.model.lora import apply_lora, lora_state_dict

    net = load_for_inference(base_dir).model
    if model:
        net = Transformer(net.cfg.model_copy(update=model))
    cfg = LoraConfig(enabled=True, rank=rank, alpha=alpha, target_modules=list(targets))
    apply_lora(net, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora_state_dict(net).values():
            t.copy_(torch.randn(t.shape, generator=g) * scale)
    return save_adapter(net, cfg, out_dir, base_sha or manifest_sha256(base_dir))
