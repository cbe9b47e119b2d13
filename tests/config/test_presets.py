import pytest
import torch

from bastion.config.presets import PRESETS, model_config
from bastion.model import Transformer


def analytic_params(cfg) -> int:
    d, hd, f = cfg.d_model, cfg.head_dim, cfg.ffn_dim
    attn = d * cfg.n_head * hd * 2 + d * cfg.kv_heads * hd * 2
    per_layer = attn + 3 * d * f + 2 * d
    return cfg.vocab_size * d + cfg.n_layer * per_layer + d


@pytest.mark.parametrize("name, vocab, lo, hi", [
    ("tiny", 8192, 0.5e6, 0.7e6),
    ("mini", 8192, 2.8e6, 3.4e6),
    ("small", 32000, 20e6, 25e6),
    ("base", 50257, 120e6, 130e6),
])
def test_preset_parameter_counts(name, vocab, lo, hi):
    cfg = model_config(name, vocab_size=vocab)
    with torch.device("meta"):  # no memory, no init cost
        model = Transformer(cfg)
    n = model.num_params()
    assert n == analytic_params(cfg)
    assert lo <= n <= hi


def test_presets_shapes():
    assert set(PRESETS) >= {"tiny", "mini", "small", "base"}
    tiny = model_config("tiny")
    assert (tiny.d_model, tiny.n_layer, tiny.n_head, tiny.kv_heads, tiny.max_seq_len) == (64, 2, 4, 2, 128)
    assert tiny.vocab_size is None  # filled from the tokenizer


def test_overrides_and_unknown_preset():
    cfg = model_config("mini", vocab_size=300, max_seq_len=512, dropout=0.1)
    assert (cfg.d_model, cfg.max_seq_len, cfg.dropout, cfg.vocab_size) == (192, 512, 0.1, 300)
    with pytest.raises(ValueError, match="unknown model preset 'huge'.*tiny, mini, small, base"):
        model_config("huge")
    with pytest.raises(ValueError):
        model_config("tiny", not_a_field=1)  # the schema forbids unknown keys
