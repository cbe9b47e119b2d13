"""LoRA layers: wrapping starts identical, only adapters train, merging is exact."""
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from bastion.config.schema import LoraConfig
from bastion.errors import ConfigError
from bastion.model.lora import LoRALinear, apply_lora, lora_state_dict, merge_lora
from helpers import LORA_TARGETS, lora_test_ids, lora_test_model, randomize_adapters

@pytest.mark.parametrize("targets", [["wq", "wk", "wv", "wo"], LORA_TARGETS])
def test_wrapped_model_starts_identical_and_keeps_base_names(targets):
    model = lora_test_model(qkv_bias=True).eval()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model(lora_test_ids())[0]
    wrapped = apply_lora(model, LoraConfig(enabled=True, rank=4, alpha=8, target_modules=targets))
    assert len(wrapped) == 2 * len(targets) and wrapped[0].startswith("layers.0.")
    assert isinstance(model.layers[1].attention.wq, LoRALinear)
    torch.testing.assert_close(model(lora_test_ids())[0], before, rtol=0, atol=0)
    state = model.state_dict()
    lora_keys = {k for k in state if k.endswith((".lora_A", ".lora_B"))}
    assert set(state) - lora_keys == set(base_state)  # base keys unchanged (incl. wq.bias)
    assert lora_keys == {f"{m}.{ab}" for m in wrapped for ab in ("lora_A", "lora_B")}
    # a base checkpoint loads into the wrapped model unchanged (adapters are the only extras)
    result = model.load_state_dict(base_state, strict=False)
    assert sorted(result.missing_keys) == sorted(lora_keys) and not result.unexpected_keys
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == lora_keys


def test_only_lora_params_train():
    model = lora_test_model(tie_embeddings=False, qkv_bias=True)
    cfg = LoraConfig(enabled=True, rank=4, alpha=16, dropout=0.1, target_modules=["wq", "wv", "w2"])
    apply_lora(model, cfg)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert "tok_embeddings.weight" in frozen and "layers.0.attention_norm.weight" in frozen
    assert "output.weight" in frozen and "layers.0.attention.wq.weight" in frozen and "layers.0.attention.wq.bias" in frozen
    adapters_before = {k: v.clone() for k, v in lora_state_dict(model).items()}
    groups = model.param_groups(weight_decay=0.1)
    assert sorted(n for g in groups for n in g["names"]) == sorted(adapters_before)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    model.train()
    for step in range(3):
        x = lora_test_ids(seed=step)
        _, loss = model(x, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None, name
            assert torch.equal(p, frozen[name]), name  # bit-identical
    after = lora_state_dict(model)
    assert all(not torch.equal(after[k], adapters_before[k]) for k in after if k.endswith("lora_B"))


def test_merge_equals_base_plus_adapter():
    model = lora_test_model(qkv_bias=True).eval()
    base_keys = set(model.state_dict())
    apply_lora(model, LoraConfig(enabled=True, rank=8, alpha=16, target_modules=LORA_TARGETS))
    randomize_adapters(model)
    with torch.no_grad():
        expected = model(lora_test_ids())[0]
        merged = merge_lora(model)
        assert len(merged) == 14
        got = model(lora_test_ids())[0]
    assert (got - expected).abs().max().item() <= 1e-5
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.layers[0].attention.wq) is nn.Linear
    assert set(model.state_dict()) == base_keys
    assert (expected - lora_test_model(qkv_bias=True).eval()(lora_test_ids())[0]).abs().max() > 1e-3  # adapter mattered


def test_unknown_or_repeated_target_refused():
    with pytest.raises(ValidationError, match="unknown LoRA target"):
        LoraConfig(target_modules=["wq", "q_proj"])
    model = lora_test_model()
    with pytest.raises(ConfigError, match="unknown module"):
        apply_lora(model, LoraConfig.model_construct(rank=4, alpha=8.0, dropout=0.0, target_modules=["wq", "q_proj"]))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    apply_lora(model, LoraConfig(rank=4))
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, LoraConfig(rank=4))
