"""One training loop for every objective (bastion/train/tasks/): AdamW + warmup/cosine, exact
resume, verified checkpoints, DDP / FSDP2 under torchrun, DP-SGD."""
from bastion.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
