"""Evaluation: baselines and held-out loss."""
from bastion.eval.baseline import unigram_cross_entropy

__all__ = ["unigram_cross_entropy"]
