"""The engine with several LoRA adapters on one base (bastion/model/multi_lora.py): each
request runs its own adapter, requests for different adapters share decode steps, and the
padded mode stays batch-invariant."""
import pytest
import torch

from bastion.adapters import load_lora_state_dict
from bastion.config.schema import GenerateConfig, LoraConfig, ModelConfig
from bastion.infer import generate
from bastion.infer.engine import Engine
from bastion.model import Transformer
from bastion.model.lora import apply_lora, lora_state_dict, merge_lora
from bastion.model import multi_lora
from bastion.model.multi_lora import ServedAdapter, install_adapters
from bastion.tokenizer import BastionTokenizer

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3, "def main():\n    return 42\n",
         "Bastion trains small language models from raw text, safely."]
LIMITS = GenerateConfig(max_new_tokens=20, max_new_tokens_ceiling=100, temperature=0.0, top_k=None)
CONFIGS = {"one": LoraConfig(enabled=True, rank=4, alpha=8, target_modules=["wq", "wv", "w2"]),
           "two": LoraConfig(enabled=True, rank=8, alpha=8, target_modules=["wq", "wk", "wo", "w1", "w3"])}
# (prompt, adapter, sampling): greedy and seeded sampling, the base and both adapters.
REQUESTS = [("The quick", "one", dict(max_new_tokens=20)), ("The quick", None, dict(max_new_tokens=14)),
            ("The quick", "two", dict(max_new_tokens=17)), ("def main", "two", dict(max_new_tokens=9)),
            ("Bastion", "one", dict(temperature=1.0, seed=5, max_new_tokens=15)),
            ("a", None, dict(temperature=0.8, top_p=0.9, seed=6, max_new_tokens=12))]


def base_model() -> Transformer:
    torch.manual_seed(0)  # a large init: clear argmaxes (see tests/infer/test_engine.py)
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=128, init_std=0.2)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def tok() -> BastionTokenizer:
    return BastionTokenizer.train(TEXTS * 4, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def tensors() -> dict[str, dict[str, torch.Tensor]]:
    """Each adapter's lora_A / lora_B, random and large enough to change the greedy text."""
    out = {}
    for seed, (name, cfg) in enumerate(CONFIGS.items(), start=1):
        model = base_model()
        apply_lora(model, cfg)
        g = torch.Generator().manual_seed(seed)
        out[name] = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in lora_state_dict(model).items()}
    return out


@pytest.fixture(scope="module")
def served(tensors) -> Transformer:
    model = base_model()
    install_adapters(model, [ServedAdapter(name, CONFIGS[name], tensors[name]) for name in CONFIGS])
    return model


def merged_model(name, tensors) -> Transformer:
    """What `bastion merge` + `bastion generate` run: the adapter folded into the weights."""
    model = base_model()
    apply_lora(model, CONFIGS[name])
    load_lora_state_dict(model, tensors[name])
    merge_lora(model)
    return model.eval()


def no_eos(model, tok):
    def ban(module, inputs, out):
        out = out.clone()
        out[..., tok.eos_id] = float("-inf")
        return out
    return model.output.register_forward_hook(ban)


def run(model, tok, requests, *, mode, max_batch_size=4, staggered=False, queued_first=False):
    engine = Engine(model, tok, LIMITS, max_batch_size=max_batch_size, mode=mode)
    handles = []

    def submit(prompt, adapter, kw):
        ids = tok.encode(prompt)
        return engine.submit(ids, engine.params(len(ids), **kw), adapter=adapter)

    if queued_first:
        handles, requests = [submit(*r) for r in requests], []
    with engine:
        for r in requests:
            handles.append(submit(*r))
            if staggered:
                next(iter(handles[-1]))
        return [h.result(timeout=60) for h in handles]


@pytest.mark.parametrize("gather_above", [2, 0], ids=["masked", "gathered"])
def test_padded_mode_is_batch_invariant_across_adapters(served, tok, monkeypatch, gather_above):
    """A request's tokens are the same bits alone (the only row with an adapter) and batched
    with requests for other adapters and the base, joining and leaving at different times;
    with either way of batching adapters (bastion/model/multi_lora.py)."""
    monkeypatch.setattr(multi_lora, "GATHER_ABOVE", gather_above)
    hook = no_eos(served, tok)
    try:
        alone = [run(served, tok, [r], mode="padded")[0] for r in REQUESTS]
        for staggered in (False, True):
            assert run(served, tok, REQUESTS, mode="padded", staggered=staggered) == alone, staggered
    finally:
        hook.remove()
    same_prompt = [r.token_ids for r in alone[:3]]  # "The quick" with one, the base, two
    assert len({tuple(t[:9]) for t in same_prompt}) == 3, "the adapters should change the text"


@pytest.mark.parametrize("mode", ["rowwise", "padded"])
def test_adapter_requests_match_the_merged_model(served, tensors, tok, mode):
    """Greedy tokens of an adapter request = generate() on the merged model; base requests =
    generate() on the base, bit for bit in rowwise mode."""
    hook = no_eos(served, tok)
    try:
        greedy = [r for r in REQUESTS if "seed" not in r[2]]
        got = run(served, tok, greedy, mode=mode)
    finally:
        hook.remove()
    base = base_model()
    for (prompt, adapter, kw), result in zip(greedy, got):
        reference = base if adapter is None else merged_model(adapter, tensors)
        handle = no_eos(reference, tok)
        try:
            expected = generate(reference, tok, prompt, limits=LIMITS, **kw)
        finally:
            handle.remove()
        assert result.token_ids == expected.token_ids, (prompt, adapter)
        if adapter is None and mode == "rowwise":
            assert result == expected


@torch.no_grad()
def test_adapter_logits_match_the_merged_model_within_float_noise(served, tensors, tok):
    """Unmerged (W x + s B (A x), two roundings) and merged ((W + s B A) x, W + s B A rounded
    once) are different float32 arithmetic: the logits agree to ~1e-6 here. 1e-4 leaves a
    wide margin for other CPUs' kernels while still far below the gaps greedy decisions hinge on."""
    ids = torch.tensor([tok.encode(TEXTS[0])[:60]])
    for name in CONFIGS:
        with served.served_adapters.rows([served.served_adapters.index(name)]):
            got = served(ids)[0]
        torch.testing.assert_close(got, merged_model(name, tensors)(ids)[0], rtol=0, atol=1e-4)


def test_dynamic_mode_prefills_different_adapters_apart(served, tok):
    """Joining together with the same prompt, requests for different adapters are prefilled
    apart (the same adapter's share a row): each gets its own adapter's text."""
    same = [("The quick", adapter, dict(max_new_tokens=10)) for adapter in (None, "one", "two", "one")]
    hook = no_eos(served, tok)
    try:
        together = run(served, tok, same, mode="dynamic", queued_first=True)
        alone = [run(served, tok, [r], mode="rowwise")[0] for r in same]
    finally:
        hook.remove()
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert together[1].token_ids == together[3].token_ids != together[2].token_ids


def test_same_prompt_other_adapter_never_shares_a_prefill(served, tok):
    same = [("The quick", adapter, dict(max_new_tokens=8)) for adapter in (None, "one", "two")]
    hook = no_eos(served, tok)
    try:
        together = run(served, tok, same, mode="padded", queued_first=True)
        alone = [run(served, tok, [r], mode="padded")[0] for r in same]
    finally:
        hook.remove()
    assert together == alone and len({tuple(r.token_ids) for r in together}) == 3


def test_unknown_adapters_are_refused(served, tok):
    ids = tok.encode("hi")
    with Engine(served, tok, LIMITS, max_batch_size=2) as engine:
        with pytest.raises(ValueError, match="unknown adapter 'three'"):
            engine.submit(ids, engine.params(len(ids)), adapter="three")
    plain = base_model()
    with Engine(plain, tok, LIMITS, max_batch_size=2) as engine:
        assert engine._adapters is None  # a plain model: no per-row work at all
        with pytest.raises(ValueError, match="no adapters installed"):
            engine.submit(ids, engine.params(len(ids)), adapter="one")
