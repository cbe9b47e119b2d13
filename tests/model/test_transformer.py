import pytest
import torch
import torch.nn.functional as F

from bastion.config.schema import ModelConfig
from bastion.config.presets import model_config
from bastion.model import KVCache, Transformer

V = 97


def make(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(model_config("tiny", vocab_size=V, **overrides)).eval()


def tokens(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_output_shapes_and_no_loss_without_targets():
    logits, loss = make()(tokens(3, 17))
    assert logits.shape == (3, 17, V) and logits.dtype == torch.float32
    assert loss is None


def test_vocab_size_required():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(ModelConfig())


@pytest.mark.parametrize("variant", [
    dict(),  # GQA (tiny: 4 heads, 2 kv heads), tied
    dict(n_kv_head=None),  # MHA
    dict(n_kv_head=1),  # MQA
    dict(qkv_bias=True),
    dict(tie_embeddings=False),
    dict(dropout=0.1),
])
def test_variants_run_and_are_causal(variant):
    model = make(**variant)
    x = tokens(2, 24)
    logits, _ = model(x)
    assert torch.isfinite(logits).all()
    # Changing tokens after position t must not change logits at positions <= t.
    t = 10
    y = x.clone()
    y[:, t + 1:] = (y[:, t + 1:] + 1) % V
    logits2, _ = model(y)
    torch.testing.assert_close(logits2[:, :t + 1], logits[:, :t + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(logits2[:, t + 1:], logits[:, t + 1:])


def test_tied_and_untied_weights():
    tied, untied = make(), make(tie_embeddings=False)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == V * 64


def test_rope_buffers_not_in_state_dict():
    sd = make().state_dict()
    assert not any("rope" in k for k in sd)
    assert "layers.0.attention.wq.weight" in sd and "layers.1.feed_forward.w3.weight" in sd


def test_init_statistics():
    model = make(seed=0, d_model=256, n_head=4, n_layer=8)
    std = model.cfg.init_std
    assert model.layers[0].attention.wq.weight.std().item() == pytest.approx(std, rel=0.05)
    assert model.layers[0].attention.wo.weight.std().item() == pytest.approx(std / 4, rel=0.05)  # 1/sqrt(2*8)
    assert model.layers[3].feed_forward.w2.weight.std().item() == pytest.approx(std / 4, rel=0.05)
    assert torch.all(model.norm.weight == 1)
    biased = make(qkv_bias=True)
    assert torch.all(biased.layers[0].attention.wq.bias == 0)


def test_loss_matches_cross_entropy_and_ignores_minus_100():
    model = make()
    x, targets = tokens(2, 16), tokens(2, 16, seed=2)
    targets[0, :5] = -100
    logits, loss = model(x, targets)
    expected = F.cross_entropy(logits.view(-1, V), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    kept = targets != -100
    manual = F.cross_entropy(logits[kept], targets[kept])
    torch.testing.assert_close(loss, manual)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("variant", [dict(), dict(n_kv_head=None, qkv_bias=True)])
def test_kv_cache_decoding_matches_full_forward(variant):
    model = make(**variant)
    x = tokens(2, 40)
    full, _ = model(x)
    with torch.no_grad():
        # token by token
        cache = model.new_cache(2)
        steps = [model(x[:, i:i + 1], cache=cache, start_pos=i)[0] for i in range(40)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
        # prefill, then chunked prefill of uneven chunks, then single steps
        cache = model.new_cache(2, max_len=40)
        pieces, pos = [], 0
        for size in (13, 7, 1, 11, 1, 7):
            pieces.append(model(x[:, pos:pos + size], cache=cache, start_pos=pos)[0])
            pos += size
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_logits_at_picks_one_position_per_row():
    model = make()
    x = tokens(3, 20)
    with torch.no_grad():
        full, _ = model(x)
        at = torch.tensor([19, 4, 0])
        picked, loss = model(x, logits_at=at)
        assert picked.shape == (3, 1, V) and loss is None
        torch.testing.assert_close(picked[:, 0], full[torch.arange(3), at], atol=1e-5, rtol=0)
        # right-padded rows with a cache (a batched prefill): each row's last real token
        cache = model.new_cache(3, max_len=20)
        lengths = [20, 5, 1]
        padded = torch.stack([torch.cat([x[i, :n], torch.zeros(20 - n, dtype=torch.long)]) for i, n in enumerate(lengths)])
        batched, _ = model(padded, cache=cache, start_pos=0, logits_at=torch.tensor([n - 1 for n in lengths]))
        for i, n in enumerate(lengths):
            alone, _ = model(x[i:i + 1, :n])
            torch.testing.assert_close(batched[i, 0], alone[0, -1], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="one position per row"):
        model(x, logits_at=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="targets"):
        model(x, x, logits_at=torch.tensor([1, 2, 3]))


def test_new_cache_shapes():
    model = make()
    cache = model.new_cache(3, max_len=50)
    assert isinstance(cache, KVCache) and len(cache.k) == 2
    assert cache.k[0].shape == (3, 2, 50, 16) and cache.k[0].dtype == torch.float32
    with pytest.raises(ValueError, match="max_len"):
        model.new_cache(1, max_len=129)


def test_sequence_limits_are_clear_errors():
    model = make()
    with pytest.raises(ValueError, match="max_seq_len \\(128\\)"):
        model(tokens(1, 129))
    cache = model.new_cache(1)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 10), cache=cache, start_pos=120)
    small = model.new_cache(1, max_len=16)
    with pytest.raises(ValueError, match="cache's max_len"):
        model(tokens(1, 10), cache=small, start_pos=10)
    with pytest.raises(ValueError, match="batch size"):
        model(tokens(2, 4), cache=small)
    with pytest.raises(ValueError, match="needs a KV cache"):
        model(tokens(1, 4), start_pos=3)
    model(tokens(1, 128))  # exactly max_seq_len is fine


@pytest.mark.parametrize("tie", [True, False])
def test_gradients_reach_every_parameter(tie):
    model = make(tie_embeddings=tie, qkv_bias=True).train()
    _, loss = model(tokens(2, 16), tokens(2, 16, seed=3))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bf16_autocast_on_cpu():
    model = make()
    x = tokens(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, tokens(2, 16, seed=4))
        cache = model.new_cache(2)
        model(x[:, :8], cache=cache)
        step, _ = model(x[:, 8:9], cache=cache, start_pos=8)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(step).all()
    full, _ = model(x)
    assert (logits.float() - full).abs().max() < 0.1


def test_bf16_weights_run():
    model = make().to(torch.bfloat16)
    logits, loss = model(tokens(1, 8), tokens(1, 8))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)


def test_param_groups():
    for tie in (True, False):
        model = make(tie_embeddings=tie, qkv_bias=True)
        decay, no_decay = model.param_groups(0.1)
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        assert "tok_embeddings.weight" in no_decay["names"]
        assert ("output.weight" in decay["names"]) == (not tie)
        assert all(n.endswith("weight") and "norm" not in n for n in decay["names"])
        assert "layers.0.attention.wq.bias" in no_decay["names"] and "norm.weight" in no_decay["names"]
        params = decay["params"] + no_decay["params"]
        assert len({id(p) for p in params}) == len(params) == len(list(model.parameters()))
        torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)  # torch accepts the extra "names" key


def test_num_params_and_flops():
    model = make()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total
    assert model.num_params(exclude_embeddings=True) == total - V * 64
    # tied: lm_head matmul counts, so N = all params
    assert model.flops_per_token(128) == 6 * total + 12 * 2 * 64 * 128
    untied = make(tie_embeddings=False)
    assert untied.flops_per_token(1) == 6 * (untied.num_params() - V * 64) + 12 * 2 * 64


def test_packed_rows_equal_separate_documents():
    """segment_ids: packing two documents in one row gives exactly their separate logits."""
    from bastion.config.presets import model_config
    from bastion.model.transformer import Transformer, positions_within_segments

    torch.manual_seed(0)
    model = Transformer(model_config("tiny", vocab_size=64)).eval()
    a, b = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 5))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 5])
    assert positions_within_segments(segments).tolist() == [list(range(7)) + list(range(5))]
    with torch.no_grad():
        together, _ = model(packed, segment_ids=segments)
        alone_a, _ = model(a)
        alone_b, _ = model(b)
        unmasked, _ = model(packed)
    assert torch.allclose(together[:, :7], alone_a, atol=1e-5)
    assert torch.allclose(together[:, 7:], alone_b, atol=1e-5)
    assert not torch.allclose(unmasked[:, 7:], alone_b, atol=1e-3)  # without segments b sees a


@pytest.mark.parametrize("tie", [True, False])
def test_from_state_dict_assigns_without_copy_or_init(tie):
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layer=2, n_head=4, max_seq_len=64, tie_embeddings=tie, qkv_bias=True)
    ref = Transformer(cfg)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    model = Transformer.from_state_dict(cfg, state)
    assert model.layers[0].attention.wq.weight.data_ptr() == state["layers.0.attention.wq.weight"].data_ptr()
    assert (model.output.weight is model.tok_embeddings.weight) == tie
    assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    x = torch.randint(0, 100, (2, 12))
    torch.testing.assert_close(model(x)[0], ref(x)[0], rtol=0, atol=0)  # rope tables rebuilt too
    with pytest.raises(RuntimeError):
        Transformer.from_state_dict(cfg, {k: v for k, v in state.items() if "wq" not in k})


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layer=3, n_head=4, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    x = torch.randint(0, 100, (2, 16))
    grads = []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        model.zero_grad()
        _, loss = model(x, x)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == grads[1][0]
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_chunked_cross_entropy_matches_the_full_loss():
    cfg = ModelConfig(vocab_size=500, d_model=32, n_layer=2, n_head=4, max_seq_len=32)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    x = torch.randint(0, 500, (3, 20))
    y = x.clone()
    y[0, :5] = -100  # ignored targets count in neither
    results = []
    for chunk in (None, 64, 7 * 10):
        model.loss_chunk_tokens = chunk
        model.zero_grad()
        logits, loss = model(x, y)
        loss.backward()
        assert (logits is None) == (chunk is not None)
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-6)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    model.eval()
    assert model(x, y)[0] is not None  # evaluation always returns logits
