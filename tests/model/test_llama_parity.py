"""Our Transformer computes exactly what HF LlamaForCausalLM computes (random init, no download)."""
import pytest
import torch

from bastion.config.presets import model_config
from bastion.model import Transformer

transformers = pytest.importorskip("transformers")


def hf_name(name: str) -> str:
    """Our parameter name -> HF Llama's."""
    if name == "tok_embeddings.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    renames = {
        "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
        "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
        "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
        "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    }
    for ours, theirs in renames.items():
        name = name.replace(f".{ours}.", f".{theirs}.")
    return "model." + name


@pytest.mark.parametrize("tie, kv, qkv_bias", [(True, 2, False), (False, None, False), (False, 1, True)])
def test_logits_match_llama(tie, kv, qkv_bias):
    torch.manual_seed(0)
    cfg = model_config("tiny", vocab_size=101, n_kv_head=kv, tie_embeddings=tie, qkv_bias=qkv_bias,
                       rope_theta=5000.0, norm_eps=1e-5)
    ours = Transformer(cfg).eval()
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=qkv_bias, attn_implementation="eager",
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            # Randomise norms and biases too, so a mismatch there cannot hide behind ones/zeros.
            p.add_(torch.randn_like(p) * 0.1)
            hf_params.pop(hf_name(name)).copy_(p)
        for name, p in hf_params.items():  # left over: only o_proj biases (HF ties them to attention_bias)
            assert qkv_bias and name.endswith("o_proj.bias"), name
            p.zero_()
    x = torch.randint(0, cfg.vocab_size, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours_logits, _ = ours(x)
        hf_logits = hf(x).logits
    assert (ours_logits - hf_logits).abs().max().item() <= 1e-4
