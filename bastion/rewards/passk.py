"""pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): the chance
that at least one of k completions drawn from a prompt's n samples passes, unbiased:

    pass@k = 1 - C(n - c, k) / C(n, k)        (c of the n samples pass)

computed as 1 - prod_{i = n-c+1}^{n} (1 - k / i), which never forms the huge binomials.
Here (below train/ and eval/) so GRPO's validation and `bastion eval generate` share it.
"""
from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with c passing samples out of n (1 <= k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:  # every k-subset holds a passing sample
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def ks_for(n: int) -> list[int]:
    """The k reported for n samples per prompt: 1, the powers of two below n, and n."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def mean_pass_at_k(passes: Sequence[int], n: int) -> dict[int, float]:
    """pass@k averaged over prompts, for every k of `ks_for(n)`; passes[i] = prompt i's c."""
    return {k: sum(pass_at_k(n, c, k) for c in passes) / len(passes) for k in ks_for(n)}


__all__ = ["ks_for", "mean_pass_at_k", "pass_at_k"]
