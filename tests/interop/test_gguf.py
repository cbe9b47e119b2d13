"""`bastion export gguf`: gguf.GGUFReader reads back every tensor (equal after undoing the
q/k permutation, in the dtype asked for) and the llama metadata and vocabulary."""
import json
import math
import stat

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import exports
from bastion.checkpoint import load_checkpoint
from bastion.errors import CheckpointError
from bastion.interop.gguf import export_gguf, gguf_tensor_name, permute_qk, unpermute_qk
from bastion.model.transformer import apply_rope, rope_tables
from bastion.tokenizer import BastionTokenizer

TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, hello bastion", "1 + 2 = 3; 4 * 5 = 20"] * 30
TEMPLATE = "{% for m in messages %}{{ m['content'] }}<|endoftext|>{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    return BastionTokenizer.train(TEXT, vocab_size=300)


def make_checkpoint(root, tokenizer, **kwargs):
    """A checkpoint whose model has 20 padded vocabulary rows beyond the tokenizer's 300."""
    return exports.make_checkpoint(root, tokenizer, **{"vocab_size": 320, **kwargs})[0]


def fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


def test_f32_export_reads_back_exactly(tmp_path, tokenizer):
    ckpt_dir = make_checkpoint(tmp_path / "run", tokenizer, trainer_state={"chat_template": TEMPLATE})
    out = export_gguf(ckpt_dir, tmp_path / "model.gguf", dtype="f32")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    reader = gguf.GGUFReader(out)
    meta = fields(reader)
    assert meta["general.architecture"] == "llama"
    expected = {"llama.context_length": 64, "llama.embedding_length": 64, "llama.block_count": 2,
                "llama.feed_forward_length": 96, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.rope.dimension_count": 16, "llama.vocab_size": 320, "general.file_type": 0,
                "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
                "tokenizer.ggml.eos_token_id": tokenizer.eos_id, "tokenizer.ggml.padding_token_id": tokenizer.pad_id,
                "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": TEMPLATE}
    assert {k: meta[k] for k in expected} == expected
    assert meta["llama.rope.freq_base"] == 10000.0
    assert math.isclose(meta["llama.attention.layer_norm_rms_epsilon"], 1e-5, rel_tol=1e-6)
    assert "tokenizer.ggml.bos_token_id" not in meta
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == 320 and tokens[:300] == [by_id[i] for i in range(300)]
    assert tokens[300:] == [f"[PAD{i}]" for i in range(300, 320)]  # the model's padded rows
    types = meta["tokenizer.ggml.token_type"]
    assert types[tokenizer.eos_id] == gguf.TokenType.CONTROL and types[299] == gguf.TokenType.NORMAL
    assert types[310] == gguf.TokenType.UNUSED
    merges = json.loads(tokenizer.to_json_str())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges]

    state = load_checkpoint(ckpt_dir).model
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {gguf_tensor_name(n) for n in state if n != "output.weight"}  # tied: no output
    assert {"token_embd.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.0.ffn_gate.weight",
            "blk.0.attn_output.weight", "blk.1.ffn_norm.weight"} <= set(tensors)
    for name, tensor in state.items():
        if name == "output.weight":
            continue
        t = tensors[gguf_tensor_name(name)]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32
        data = torch.from_numpy(np.array(t.data)).reshape(tensor.shape)
        if ".wq." in name:
            data = unpermute_qk(data, 4)
        elif ".wk." in name:
            data = unpermute_qk(data, 2)
        assert torch.equal(data, tensor), name


def test_f16_export_with_biases_untied_and_llama3_rope(tmp_path, tokenizer):
    llama3 = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}
    ckpt_dir = make_checkpoint(tmp_path / "run", tokenizer, qkv_bias=True, tie_embeddings=False, rope_scaling=llama3)
    reader = gguf.GGUFReader(export_gguf(ckpt_dir, tmp_path / "model.gguf"))  # f16 is the default
    assert fields(reader)["general.file_type"] == 1
    tensors = {t.name: t for t in reader.tensors}
    state = load_checkpoint(ckpt_dir).model
    assert "output.weight" in tensors and "blk.0.attn_q.bias" in tensors
    for name, tensor in state.items():
        t = tensors[gguf_tensor_name(name)]
        want = gguf.GGMLQuantizationType.F16 if tensor.dim() == 2 else gguf.GGMLQuantizationType.F32
        assert t.tensor_type == want, name
        data = torch.from_numpy(np.array(t.data)).reshape(tensor.shape)
        if ".wq." in name:
            data = unpermute_qk(data, 4)
        elif ".wk." in name:
            data = unpermute_qk(data, 2)
        expected = tensor.half() if tensor.dim() == 2 else tensor
        assert torch.equal(data, expected), name
    # llama3 scaling -> rope_freqs: llama.cpp divides each base frequency by these factors.
    factors = torch.from_numpy(np.array(tensors["rope_freqs.weight"].data))
    wavelen = 2 * math.pi * 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
    assert torch.allclose(factors[wavelen < 4], torch.ones(1)) and torch.allclose(factors[wavelen > 16], torch.tensor(8.0))
    assert ((factors >= 1) & (factors <= 8)).all()


def test_linear_rope_and_sliding_window_metadata(tmp_path, tokenizer):
    ckpt_dir = make_checkpoint(tmp_path / "run", tokenizer, rope_scaling={"type": "linear", "factor": 2.0},
                               sliding_window=8, rope_theta=500.0)
    meta = fields(gguf.GGUFReader(export_gguf(ckpt_dir, tmp_path / "m.gguf", dtype="f32")))
    assert meta["llama.rope.scaling.type"] == "linear" and meta["llama.rope.scaling.factor"] == 2.0
    assert meta["llama.attention.sliding_window"] == 8 and meta["llama.rope.freq_base"] == 500.0


def test_permutation_turns_half_split_rope_into_llama_cpp_interleaved_rope():
    """Scores q.k with our (HF) RoPE == scores with llama.cpp's adjacent-pair RoPE on the
    permuted q/k rows - which is why the exporter permutes."""
    torch.manual_seed(0)
    heads, head_dim, d, T = 2, 8, 16, 6
    wq, x = torch.randn(heads * head_dim, d), torch.randn(T, d)
    cos, sin = rope_tables(head_dim, T, 10000.0)
    ours = apply_rope((x @ wq.T).view(T, heads, head_dim).transpose(0, 1), cos, sin)  # [H, T, hd]

    q = (x @ permute_qk(wq, heads).T).view(T, heads, head_dim).transpose(0, 1)
    pairs = q.reshape(heads, T, head_dim // 2, 2)
    angles = torch.outer(torch.arange(T).float(), 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    c, s = angles.cos(), angles.sin()  # [T, head_dim / 2]: pair i of position t turns by angles[t, i]
    rotated = torch.stack((pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c), dim=-1)
    theirs = rotated.reshape(heads, T, head_dim)
    # Same vectors up to the fixed per-head row permutation, so equal dot products.
    assert torch.allclose(ours @ ours.transpose(1, 2), theirs @ theirs.transpose(1, 2), atol=1e-4)
    assert torch.allclose(unpermute_qk(permute_qk(wq, heads), heads), wq)


def test_refusals_leave_no_file(tmp_path, tokenizer):
    ckpt_dir = make_checkpoint(tmp_path / "run", tokenizer)
    with pytest.raises(CheckpointError, match="one of f32, f16, q8_0, q4_0, not 'q4_k'"):
        export_gguf(ckpt_dir, tmp_path / "a.gguf", dtype="q4_k")
    (tmp_path / "b.gguf").write_bytes(b"keep")
    with pytest.raises(CheckpointError, match="already exists"):
        export_gguf(ckpt_dir, tmp_path / "b.gguf")
    assert (tmp_path / "b.gguf").read_bytes() == b"keep"
    export_gguf(ckpt_dir, tmp_path / "b.gguf", overwrite=True)
    assert gguf.GGUFReader(tmp_path / "b.gguf").tensors

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    metaspace = Tokenizer(models.BPE())
    metaspace.pre_tokenizer = pre_tokenizers.Metaspace()
    metaspace.decoder = decoders.Metaspace()
    metaspace.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=100, special_tokens=["<|endoftext|>", "<|pad|>"],
                                                            show_progress=False))
    other = make_checkpoint(tmp_path / "run2", BastionTokenizer(metaspace))
    with pytest.raises(CheckpointError, match="byte-level"):
        export_gguf(other, tmp_path / "c.gguf")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["b.gguf"]


@pytest.mark.parametrize("run_name, root, expected", [
    ("sft-chat-v2", "out/checkpoints", "sft-chat-v2"),  # a name the run chose wins over its folder
    ("run", "my-sft/checkpoints", "my-sft"),  # the default name: the run folder (RUN/checkpoints/step_N)
    ("run", "merged", "merged"),  # a checkpoint root (ROOT/step_N): the root's name
    ("***REDACTED***", "my-sft/checkpoints", "my-sft"),  # a redacted secret is no name
])
def test_general_name_is_the_runs_name(tmp_path, tokenizer, run_name, root, expected):
    ckpt_dir = make_checkpoint(tmp_path / root, tokenizer, sections={"train": {"seq_len": 64, "run_name": run_name}})
    meta = fields(gguf.GGUFReader(export_gguf(tmp_path / root, tmp_path / "m.gguf", dtype="f32")))
    assert ckpt_dir.parent == tmp_path / root and meta["general.name"] == expected
