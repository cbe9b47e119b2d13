"""Pick the next token from logits: greedy, temperature, top-k, then top-p (nucleus)."""
from __future__ import annotations

import torch


def penalize(logits: torch.Tensor, *, history: list[int], completion: list[int],
             logit_bias: tuple[tuple[int, float], ...] = (), repetition_penalty: float = 1.0,
             frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> torch.Tensor:
    """One row's logits [1, V] (float32 copy) adjusted before sampling, in this order:
    `logit_bias` added per token id (OpenAI); `repetition_penalty` r on every token of
    `history` (prompt and completion so far): a positive logit divided by r, a negative one
    multiplied (Hugging Face's, CTRL's); `frequency_penalty` times each token's count in
    `completion`, and `presence_penalty` once for each token in it, subtracted (OpenAI's)."""
    out = logits.float().clone()
    if logit_bias:
        ids = torch.tensor([t for t, _ in logit_bias], device=out.device)
        out[0, ids] += torch.tensor([b for _, b in logit_bias], device=out.device)
    if repetition_penalty != 1.0 and history:
        seen = torch.tensor(sorted(set(history)), device=out.device)
        values = out[0, seen]
        out[0, seen] = torch.where(values > 0, values / repetition_penalty, values * repetition_penalty)
    if (frequency_penalty or presence_penalty) and completion:
        counts = torch.bincount(torch.tensor(completion, device=out.device), minlength=out.size(-1)).float()
        out[0] -= frequency_penalty * counts + presence_penalty * (counts > 0).float()
    return out


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float,
                generator: torch.Generator | None = None, min_p: float = 0.0) -> torch.Tensor:
    """logits [B, V] -> token ids [B].

    temperature 0 is greedy (argmax). Otherwise logits are divided by temperature, cut to the
    top_k most likely tokens (None = no cut), then to the smallest set whose probability
    reaches top_p (1.0 = no cut), then to the tokens at least min_p times as likely as the
    most likely one (0 = no cut), and sampled with `generator` (seed it for reproducibility).
    """
    if not temperature >= 0:  # also rejects nan
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
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
    if min_p > 0:  # the most likely token always stays: its probability is the max
        probs = probs.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), 0.0)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
