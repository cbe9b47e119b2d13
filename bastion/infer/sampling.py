"""Pick the next token from logits: greedy, temperature, top-k, then top-p (nucleus)."""
from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B].

    temperature 0 is greedy (argmax). Otherwise logits are divided by temperature, cut to the
    top_k most likely tokens (None = no cut), then to the smallest set whose probability
    reaches top_p (1.0 = no cut), and sampled with `generator` (seed it for reproducibility).
    """
    if not temperature >= 0:  # also rejects nan
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    # Sampling at a temperature below float32's smallest normal number is greedy: dividing
    # by it in float32 would divide by 0. Above it, the largest logit is shifted to 0 first, so
    # a tiny temperature sends the others to -inf rather than all of them to inf (nan).
    if temperature < torch.finfo(torch.float32).tiny:
        return logits.argmax(dim=-1)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.size(-1):
        # Keep exactly k (scatter, not a >= threshold) so ties cannot widen the set.
        values, indices = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter(-1, indices, values)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the token that
        # crosses the threshold stays, and so does the most likely one.
        remove = (probs.cumsum(dim=-1) - probs) >= top_p
        remove[..., 0] = False
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits.masked_fill(remove, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
