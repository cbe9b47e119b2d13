"""`bastion export gguf --dtype q8_0 | q4_0`: the gguf package's quantizers stay within their
formats' error bounds, every tensor gets the type llama.cpp's conventions give it, the metadata
is the f16 export's, and a model rebuilt from the dequantized file gives logits close to ours."""
import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import exports
from bastion.errors import CheckpointError
from bastion.interop.gguf import GGUF_DTYPES, export_gguf, gguf_tensor_name, stored_values, tensor_type, unpermute_qk
from bastion.model import Transformer

Q = gguf.GGMLQuantizationType
# Each block's scale is stored as f16: relative rounding error at most 2^-11 (normal range), and
# every dequantized value is (integer level) * scale, so it moves by |level| * scale * 2^-11.
F16_REL = 2.0 ** -11
F32_SLACK = 1e-6  # float32 arithmetic inside the quantizer, relative to the block's largest value


def sample(seed: int) -> np.ndarray:
    """64 rows of 256 values, row scales 0.05..5 (block scales stay in f16's normal range)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((64, 256)) * rng.uniform(0.05, 5.0, (64, 1))).astype(np.float32)


def fields(reader):
    return {name: field.contents() for name, field in reader.fields.items()}


def types(reader):
    return {t.name: t.tensor_type for t in reader.tensors}


def test_q8_0_blocks_round_trip_within_half_a_step():
    """Q8_0: d = amax / 127, q = round(x / d) in [-127, 127]; so |x - q d| <= d / 2, plus
    127 d 2^-11 for storing d as f16."""
    x = sample(0)
    q = gguf.quants.quantize(x, Q.Q8_0)
    assert q.dtype == np.uint8 and q.shape == (64, 256 // 32 * 34)  # f16 scale + 32 int8 per block
    back = gguf.quants.dequantize(q, Q.Q8_0)
    assert back.shape == x.shape
    blocks, err = x.reshape(-1, 32), np.abs(back - x).reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    d = amax / 127
    assert (err <= d / 2 + 127 * d * F16_REL + F32_SLACK * amax).all()
    assert (err / d).max() > 0.45  # the bound is tight: some value is nearly half a step off
    assert (err / amax).max() < 0.0045  # what the CLI's help says: about 0.4% of the block's largest


def test_q4_0_blocks_round_trip_within_half_a_step_except_the_clipped_end():
    """Q4_0 (gguf.quants.Q4_0, ggml's reference): m = the block's value of largest magnitude,
    d = m / -8, q = min(15, trunc(x / d + 8.5)), value (q - 8) d. x / d lies in [-8, 8]: m
    itself is level -8; rounding costs at most |d| / 2 = amax / 16, except for values with
    x / d > 7.5 (opposite sign to m, nearly as large), which clip to level 7: up to |d|."""
    x = sample(1)
    q = gguf.quants.quantize(x, Q.Q4_0)
    assert q.dtype == np.uint8 and q.shape == (64, 256 // 32 * 18)  # f16 scale + 32 nibbles per block
    back = gguf.quants.dequantize(q, Q.Q4_0)
    blocks, err = x.reshape(-1, 32), np.abs(back - x).reshape(-1, 32)
    m = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1, keepdims=True), axis=1)
    d = np.abs(m / -8)
    slack = 8 * d * F16_REL + F32_SLACK * np.abs(m)
    clipped = blocks / (m / -8) > 7.5
    assert (err[~clipped] <= (d / 2 + slack).repeat(32, axis=1)[~clipped]).all()
    assert (err <= d + slack).all()
    assert (err / d).max() > 0.45

    # The clipped end, exactly: -1 is the largest magnitude (first found), so d = 1/8 and +1 is
    # level 8 -> clipped to 7 -> 0.875, off by a whole step.
    edge = np.zeros((1, 32), np.float32)
    edge[0, :2] = [-1.0, 1.0]
    assert gguf.quants.dequantize(gguf.quants.quantize(edge, Q.Q4_0), Q.Q4_0)[0, :2].tolist() == [-1.0, 0.875]


@pytest.fixture(scope="module")
def tokenizer():
    return exports.bastion_tokenizer(vocab_size=320)


@pytest.fixture(scope="module")
def untied(tmp_path_factory, tokenizer):
    """(checkpoint dir, model, {dtype: GGUFReader}): untied head, q/k/v biases, all three exports."""
    root = tmp_path_factory.mktemp("untied")
    ckpt_dir, net = exports.make_checkpoint(root / "run", tokenizer, tie_embeddings=False, qkv_bias=True,
                                            vocab_size=320, d_model=128, d_ff=256)
    readers = {dtype: gguf.GGUFReader(export_gguf(ckpt_dir, root / f"{dtype}.gguf", dtype=dtype))
               for dtype in ("f16", "q8_0", "q4_0")}
    return ckpt_dir, net, readers


def test_tensor_types_and_file_type(untied):
    _, net, readers = untied
    want_file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                      "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}
    for dtype, reader in readers.items():
        assert fields(reader)["general.file_type"] == want_file_type[dtype]
        got = types(reader)
        assert set(got) == {gguf_tensor_name(n) for n in net.state_dict()}
        for name, tensor in net.state_dict().items():
            gname = gguf_tensor_name(name)
            if tensor.dim() == 1:
                want = Q.F32  # norms and biases
            elif dtype == "q4_0" and gname == "output.weight":
                want = Q.Q8_0  # the lm head keeps 8 bits
            else:
                want = Q[dtype.upper()]
            assert got[gname] == want, (dtype, gname)
    assert types(readers["q4_0"])["token_embd.weight"] == Q.Q4_0  # untied: the embedding is no head


def test_metadata_and_vocabulary_equal_the_f16_exports(untied):
    _, _, readers = untied
    base = fields(readers["f16"])
    assert any(k.startswith("tokenizer.ggml.") for k in base) and "tokenizer.chat_template" in base
    for dtype in ("q8_0", "q4_0"):
        meta = fields(readers[dtype])
        assert {k: v for k, v in meta.items() if k != "general.file_type"} == \
               {k: v for k, v in base.items() if k != "general.file_type"}, dtype


def dequantized_model(reader, net: Transformer) -> Transformer:
    """Our model holding the GGUF file's values (dequantized, q/k permutation undone)."""
    tensors = {t.name: t for t in reader.tensors}
    state = {}
    for name, tensor in net.state_dict().items():
        gname = gguf_tensor_name(name)
        t = tensors[gname if gname in tensors else "token_embd.weight"]  # tied: the file has no output
        values = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type).copy())
        values = values.reshape(tensor.shape).to(torch.float32)
        if ".wq." in name:
            values = unpermute_qk(values, net.cfg.n_head)
        elif ".wk." in name:
            values = unpermute_qk(values, net.cfg.kv_heads)
        state[name] = values
    return Transformer.from_state_dict(net.cfg, state).eval()


def relative_logit_error(reader, net: Transformer) -> float:
    ids = torch.randint(0, net.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = net(ids)[0], dequantized_model(reader, net)(ids)[0]
    return float((theirs - ours).norm() / ours.norm())


def test_dequantized_models_logits_stay_close(untied):
    """Relative logit error |theirs - ours| / |ours| measured on this model (d_model 128,
    2 layers, random weights, 96 positions): f16 3.5e-4, q8_0 8.4e-3, q4_0 9.4e-2 (top-1 token
    agreement 99%, 96%, 87%); each bound is about 2x the measurement."""
    _, net, readers = untied
    err = {dtype: relative_logit_error(reader, net) for dtype, reader in readers.items()}
    assert err["f16"] < 1e-3 and err["q8_0"] < 2e-2 and err["q4_0"] < 0.2, err
    assert err["f16"] < err["q8_0"] < err["q4_0"] and err["q4_0"] > 5 * err["q8_0"], err


def assert_stored_values_are_the_files(reader, net: Transformer, dtype: str) -> None:
    """stored_values (what `eval perplexity --formats gguf-*` measures) is bit for bit what
    the exported file holds, dequantized by gguf."""
    ours = stored_values(net.state_dict(), net.cfg, dtype)
    theirs = dequantized_model(reader, net).state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), (dtype, name)


def test_stored_values_equal_the_exported_files_values(untied):
    _, net, readers = untied
    for dtype, reader in readers.items():
        assert_stored_values_are_the_files(reader, net, dtype)
    with pytest.raises(CheckpointError, match="GGUF dtype must be one of"):
        stored_values(net.state_dict(), net.cfg, "q5_k")


def test_tied_head_keeps_8_bits_and_short_rows_fall_back_to_f16(tmp_path, tokenizer):
    """Tied embeddings: token_embd is the lm head too, so in a q4_0 file it is q8_0 (llama.cpp
    treats it alike). d_ff 80: ffn_down's rows are 80 long, not whole 32-value blocks -> f16."""
    ckpt_dir, net = exports.make_checkpoint(tmp_path / "run", tokenizer, vocab_size=320, d_ff=80)
    for dtype in ("q8_0", "q4_0"):
        reader = gguf.GGUFReader(export_gguf(ckpt_dir, tmp_path / f"{dtype}.gguf", dtype=dtype))
        assert_stored_values_are_the_files(reader, net, dtype)
        got = types(reader)
        assert "output.weight" not in got and got["token_embd.weight"] == Q.Q8_0
        assert got["blk.0.ffn_down.weight"] == Q.F16 and got["blk.1.ffn_down.weight"] == Q.F16
        assert got["blk.0.ffn_gate.weight"] == Q[dtype.upper()] and got["blk.0.attn_q.weight"] == Q[dtype.upper()]
        assert relative_logit_error(reader, net) < 0.1  # measured: q8_0 7.6e-3, q4_0 4.0e-2


@pytest.mark.parametrize("name, shape, dtype, tied, want", [
    ("blk.0.attn_norm.weight", (64,), "q4_0", False, "f32"),
    ("blk.0.attn_q.bias", (64,), "q8_0", False, "f32"),
    ("blk.0.attn_q.weight", (64, 64), "f16", False, "f16"),
    ("blk.0.attn_q.weight", (64, 64), "f32", False, "f32"),
    ("blk.0.attn_q.weight", (64, 64), "q8_0", False, "q8_0"),
    ("blk.0.attn_q.weight", (64, 64), "q4_0", False, "q4_0"),
    ("blk.0.ffn_down.weight", (64, 80), "q4_0", False, "f16"),  # 80 is not a multiple of 32
    ("blk.0.ffn_up.weight", (80, 64), "q4_0", False, "q4_0"),  # only the row length matters
    ("output.weight", (320, 64), "q4_0", False, "q8_0"),
    ("output.weight", (320, 48), "q4_0", False, "f16"),
    ("token_embd.weight", (320, 64), "q4_0", False, "q4_0"),
    ("token_embd.weight", (320, 64), "q4_0", True, "q8_0"),
    ("token_embd.weight", (320, 64), "q8_0", True, "q8_0"),
])
def test_tensor_type(name, shape, dtype, tied, want):
    assert tensor_type(name, shape, dtype, tied=tied) == want


def test_bad_dtype_refused_by_api_and_cli(tmp_path, tokenizer):
    import typer
    from typer.testing import CliRunner

    from bastion.cli import _BastionGroup
    from bastion.interop.cli import GGUFDType, export_app

    assert tuple(sorted(d.value for d in GGUFDType)) == tuple(sorted(GGUF_DTYPES))
    ckpt_dir, _ = exports.make_checkpoint(tmp_path / "run", tokenizer, vocab_size=320)
    with pytest.raises(CheckpointError, match="one of f32, f16, q8_0, q4_0, not 'q6_k'"):
        export_gguf(ckpt_dir, tmp_path / "a.gguf", dtype="q6_k")
    app = typer.Typer(cls=_BastionGroup)
    app.add_typer(export_app, name="export")
    runner = CliRunner()
    bad = runner.invoke(app, ["export", "gguf", str(ckpt_dir), str(tmp_path / "b.gguf"), "--dtype", "q6_k"])
    assert bad.exit_code == 2 and "q6_k" in bad.output and "q4_0" in bad.output and "Traceback" not in bad.output
    good = runner.invoke(app, ["export", "gguf", str(ckpt_dir), str(tmp_path / "c.gguf"), "--dtype", "q4_0"])
    assert good.exit_code == 0 and "(q4_0)" in good.output, good.output
    assert fields(gguf.GGUFReader(tmp_path / "c.gguf"))["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["c.gguf"]
