"""Helpers shared by tests (import as `from helpers import ...`)."""
from bastion.config import build_config


def tiny_config(data_dir, out_dir, **train):
    settings = {"data_dir": str(data_dir), "out_dir": str(out_dir), "seq_len": 64, "batch_size": 8,
                "max_steps": 40, "lr": 3e-3, "warmup_steps": 5, "eval_every": 20, "eval_batches": 2,
                "log_every": 1, "seed": 7, "threads": 1}
    settings.update(train)
    return build_config({"model": {"preset": "tiny", "dropout": 0.1}, "train": settings,
                         "checkpoint": {"every_steps": 15, "keep_last": 2}})
