"""Multi-LoRA layers (bastion/model/multi_lora.py): several adapters on one base, chosen per
batch row, computing what each adapter alone computes."""
import pytest
import torch

from bastion.config.schema import LoraConfig
from bastion.model import multi_lora
from bastion.model.lora import apply_lora, lora_state_dict
from bastion.model.multi_lora import (
    MultiLoRALinear,
    ServedAdapter,
    expected_shapes,
    install_adapters,
    multi_lora_modules,
    served_adapters,
)
from helpers import lora_test_ids, lora_test_model, randomize_adapters

ONE = LoraConfig(enabled=True, rank=4, alpha=8, target_modules=["wq", "wv", "w2"])
TWO = LoraConfig(enabled=True, rank=2, alpha=4, target_modules=["wq", "wk", "wo", "w1", "w3"])


def lora_model(cfg, seed):
    """The base (seed 0) with one adapter as training holds it: LoRALinear, unmerged."""
    model = lora_test_model()
    apply_lora(model, cfg)
    randomize_adapters(model, seed)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    one, two = lora_model(ONE, 1), lora_model(TWO, 2)
    served = lora_test_model().eval()
    adapters = install_adapters(served, [
        ServedAdapter("one", ONE, {k: v.clone() for k, v in lora_state_dict(one).items()}),
        ServedAdapter("two", TWO, {k: v.clone() for k, v in lora_state_dict(two).items()}),
    ])
    return served, adapters, lora_test_model().eval(), one, two


# Several rows take one masked matmul over every adapter, or (many adapters) per-row gathers.
BOTH_PATHS = pytest.mark.parametrize("gather_above", [100, 0], ids=["masked", "gathered"])


@BOTH_PATHS
@torch.no_grad()
def test_each_row_computes_its_own_adapter(models, monkeypatch, gather_above):
    """Row b with adapter i gives what the LoRALinear model of adapter i gives (the same
    math, unmerged: x A^T B^T * alpha / r), the base row the base; the union of the
    targets is wrapped, a smaller rank zero-padded to the largest."""
    monkeypatch.setattr(multi_lora, "GATHER_ABOVE", gather_above)
    served, adapters, base, one, two = models
    ids = lora_test_ids(T=12)
    x = torch.cat([ids, ids, ids[:1]])  # rows: base, one, two, ... as indices say
    with adapters.rows([0, 1, 2, 2, 1]):
        got = served(x)[0]
    want = [base(x[:1])[0], one(x[1:2])[0], two(x[2:3])[0], two(x[3:4])[0], one(x[4:5])[0]]
    for row, expected in enumerate(want):
        torch.testing.assert_close(got[row:row + 1], expected, rtol=0, atol=1e-5)
    assert set(n.rsplit(".", 1)[1] for n in multi_lora_modules(served)) == {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
    layer = next(iter(multi_lora_modules(served).values()))
    assert (layer.slots, layer.rank) == (3, 4)  # base + 2 adapters, the largest rank
    assert served_adapters(served) is adapters and adapters.names == ("one", "two")


@BOTH_PATHS
@torch.no_grad()
def test_a_row_does_not_depend_on_the_other_rows(models, monkeypatch, gather_above):
    """Same shapes, other rows' adapters and tokens changed: the row's logits are the same bits."""
    monkeypatch.setattr(multi_lora, "GATHER_ABOVE", gather_above)
    served, adapters, *_ = models
    ids = lora_test_ids(T=10)
    other = torch.randint(0, 97, ids.shape, generator=torch.Generator().manual_seed(9))
    with adapters.rows([1, 2]):
        first = served(ids)[0][0]
    with adapters.rows([1, 0]):
        again = served(torch.stack([ids[0], other[1]]))[0][0]
    assert torch.equal(first, again)


@torch.no_grad()
def test_base_rows_and_no_rows_are_the_base_model(models):
    served, adapters, base, *_ = models
    ids = lora_test_ids()
    assert torch.equal(served(ids)[0], base(ids)[0])  # no rows set: the base, nothing added
    with adapters.rows([0, 0]):
        assert torch.equal(served(ids)[0], base(ids)[0])
    with adapters.rows([1, 0]):
        mixed = served(ids)[0]
    assert torch.equal(mixed[1], base(ids)[0][1]) and not torch.equal(mixed[0], base(ids)[0][0])


def test_rows_are_checked_and_reset(models):
    served, adapters, *_ = models
    with pytest.raises(ValueError, match="3 indices for a batch of 2"), adapters.rows([1, 1, 1]):
        served(lora_test_ids())
    assert adapters.index(None) == 0 and adapters.index("two") == 2
    with pytest.raises(KeyError, match="unknown adapter 'three'"):
        adapters.index("three")
    with adapters.rows([1, 2]):
        pass
    assert multi_lora_modules(served)["layers.0.attention.wq"]._rows.index is None


def test_install_refuses_twice_and_nothing(models):
    served, *_ = models
    with pytest.raises(ValueError, match="already"):
        install_adapters(served, [ServedAdapter("x", ONE, {})])
    with pytest.raises(ValueError, match="at least one"):
        install_adapters(lora_test_model(), [])


def test_expected_shapes_follow_rank_and_targets():
    shapes = expected_shapes(lora_test_model(), ONE)
    assert len(shapes) == 2 * 3 * 2  # layers x targets x (A, B)
    assert shapes["layers.1.feed_forward.w2.lora_A"] == (4, 48) and shapes["layers.1.feed_forward.w2.lora_B"] == (32, 4)


@torch.no_grad()
def test_bfloat16_model_gets_bfloat16_adapters(models):
    _, _, _, one, _ = models
    model = lora_test_model().eval().to(torch.bfloat16)
    adapters = install_adapters(model, [ServedAdapter("one", ONE, dict(lora_state_dict(one)))])
    layer = multi_lora_modules(model)["layers.0.attention.wq"]
    assert isinstance(layer, MultiLoRALinear) and layer.lora_A.dtype == torch.bfloat16
    with adapters.rows([1, 1]):
        logits = model(lora_test_ids())[0]
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
