"""One training loop (objectives: clm), AdamW + warmup/cosine, exact resume, safe checkpoints."""
from bastion.train.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
