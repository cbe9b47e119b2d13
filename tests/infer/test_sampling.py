import math

import pytest
import torch

from bastion.infer import sample_next
from bastion.infer.sampling import penalize

PROBS = [0.5, 0.3, 0.15, 0.05]


def draws(probs, n=4000, seed=0, **kw) -> torch.Tensor:
    logits = torch.tensor(probs).log().expand(n, -1)  # one row per draw
    kw = {"temperature": 1.0, "top_k": None, "top_p": 1.0, **kw}
    return sample_next(logits, generator=torch.Generator().manual_seed(seed), **kw)


def test_greedy_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next(logits, 0.0, None, 1.0), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 0.0, 3, 0.5), logits.argmax(-1))  # filters irrelevant when greedy


def test_top_k_one_is_greedy():
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_next(logits, 1.5, 1, 1.0, torch.Generator().manual_seed(2)), logits.argmax(-1))


def test_top_k_keeps_only_k_most_likely():
    out = draws(PROBS, top_k=2)
    assert set(out.tolist()) == {0, 1}
    assert (out == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)


@pytest.mark.parametrize("top_p, nucleus", [(0.3, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_nucleus(top_p, nucleus):
    # Smallest set of most likely tokens whose probability reaches top_p.
    out = draws(PROBS, top_p=top_p, n=8000)
    assert set(out.tolist()) == nucleus
    mass = sum(PROBS[i] for i in nucleus)
    for i in nucleus:
        assert (out == i).float().mean().item() == pytest.approx(PROBS[i] / mass, abs=0.03)


def test_top_p_works_on_unsorted_logits():
    probs = [0.05, 0.15, 0.5, 0.3]
    assert set(draws(probs, top_p=0.75).tolist()) == {2, 3}


def test_top_k_then_top_p():
    # top_k=3 renormalises to [.526, .316, .158]; top_p=0.8 then keeps tokens 0 and 1.
    assert set(draws(PROBS, top_k=3, top_p=0.8).tolist()) == {0, 1}


def test_temperature_sharpens_and_flattens():
    cold = draws(PROBS, temperature=0.25)
    hot = draws(PROBS, temperature=4.0)
    assert (cold == 0).float().mean() > 0.85
    assert (hot == 3).float().mean() > 0.15


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-40, 1e-37])
def test_tiny_temperature_is_greedy_not_nan(temperature):
    assert set(draws(PROBS, n=64, temperature=temperature).tolist()) == {0}


def test_seeded_generator_reproducible():
    assert torch.equal(draws(PROBS, seed=5), draws(PROBS, seed=5))
    assert not torch.equal(draws(PROBS, seed=5), draws(PROBS, seed=6))


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(temperature=math.nan), dict(top_k=0),
                                dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_arguments(kw):
    args = {"temperature": 1.0, "top_k": None, "top_p": 1.0, **kw}
    with pytest.raises(ValueError):
        sample_next(torch.zeros(1, 4), **args)


def test_min_p_keeps_tokens_at_least_that_share_of_the_top_one():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(logits, 1.0, None, 1.0, g, min_p=0.35)) for _ in range(400)}
    assert drawn == {0, 1}  # 0.15 < 0.35 * 0.5
    assert {int(sample_next(logits, 1.0, None, 1.0, g, min_p=1.0)) for _ in range(50)} == {0}
    with pytest.raises(ValueError, match="min_p"):
        sample_next(logits, 1.0, None, 1.0, g, min_p=1.5)


def test_penalize_applies_bias_repetition_then_frequency_and_presence():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    out = penalize(logits, history=[0, 1, 4, 2, 2], completion=[2, 2, 4], logit_bias=((3, -100.0), (4, 1.0)),
                   repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # token 0: seen, positive -> 2 / 2; token 1: seen, negative -> -1 * 2; token 2: 0.5 / 2, then
    # twice in the completion -> -2 * 0.5 - 0.25; token 3: biased only; token 4: 0 + 1 -> / 2,
    # then once -> -0.5 - 0.25.
    assert out.tolist() == [[1.0, -2.0, 0.25 - 1.0 - 0.25, -97.0, 0.5 - 0.5 - 0.25]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0, 0.0]]  # the input is left alone
    assert torch.equal(penalize(logits, history=[0], completion=[0]), logits)  # nothing asked: unchanged
