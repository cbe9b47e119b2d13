"""--quantize int8|int4 and quantized checkpoints (`bastion quantize`) on a briefly trained
tiny model: logits near full precision, greedy completions that agree, checkpoints that
reload bit for bit without pickle, and tampering refused."""
import json

import pytest
import torch
from typer.testing import CliRunner

from bastion.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from bastion.checkpoint.contents import load_full_model
from bastion.cli import app
from bastion.config.schema import GenerateConfig
from bastion.errors import CheckpointError
from bastion.infer import generate
from bastion.infer.loading import load_for_inference
from bastion.infer.quantize import quantize_checkpoint, weight_bytes
from synthetic.corpus import grammar_documents

runner = CliRunner()
LIMITS = GenerateConfig(max_new_tokens=24, max_new_tokens_ceiling=100, temperature=0.0)
# Measured on this model (docs/quantization.md), with the CPU kernels load_for_inference uses:
# relative logit error ||q - f|| / ||f|| 0.0012 (int8) and 0.016 (int4) (torchao's float32
# linears: 0.0010 / 0.016); top-1 agreement 100% for both; greedy 24-token completions of
# 40 held-out prompts identical 40/40 for both. The bounds leave about 3x room.
REL_ERROR = {"int8": 0.004, "int4": 0.05}
TOP1_FLOOR = 0.95
GREEDY_FLOOR = 0.8


@pytest.fixture(scope="module")
def trained(grammar_checkpoint):
    """A 2-layer d_model 64 model trained for 200 AdamW steps on the synthetic agreement
    grammar (loss ~0.9), saved as a Bastion checkpoint."""
    return grammar_checkpoint  # shared by the session (tests/conftest.py)


@pytest.fixture(scope="module")
def full(trained):
    return load_for_inference(trained)


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    return {mode: quantize_checkpoint(trained, root / mode, mode) for mode in ("int8", "int4")}


def held_out(tok, n=40):
    docs = grammar_documents(n, seed=99)
    return torch.tensor([tok.encode(docs[0])[:100]]), [" ".join(d.split()[:4]) for d in docs]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_logits_and_greedy_completions_stay_close_to_full_precision(full, trained, mode):
    q = load_for_inference(trained, quantize=mode)
    assert q.quantization == mode
    x, prompts = held_out(full.tokenizer)
    with torch.inference_mode():
        ref, out = full.model(x)[0], q.model(x)[0]
        expected = [generate(full.model, full.tokenizer, p, limits=LIMITS).token_ids for p in prompts]
        got = [generate(q.model, q.tokenizer, p, limits=LIMITS).token_ids for p in prompts]
    assert ((out - ref).norm() / ref.norm()).item() < REL_ERROR[mode]
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean().item() >= TOP1_FLOOR
    assert sum(a == b for a, b in zip(got, expected)) >= GREEDY_FLOOR * len(prompts)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_checkpoint_reloads_bit_identical_without_requantizing(trained, saved, mode, monkeypatch):
    on_the_fly = load_for_inference(trained, quantize=mode)
    import bastion.infer.loading as loading

    monkeypatch.setattr(loading, "quantize_model", lambda *a: pytest.fail("re-quantized"))
    reloaded = load_for_inference(saved[mode])
    assert reloaded.quantization == mode
    a, b = on_the_fly.model.state_dict(), reloaded.model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert type(a[name]) is type(b[name]), name
        parts = ("qdata", "scale", "zero_point") if type(a[name]) is not torch.Tensor else (None,)
        for part in parts:
            x, y = (a[name], b[name]) if part is None else (getattr(a[name], part), getattr(b[name], part))
            assert x.dtype == y.dtype and torch.equal(x, y), (name, part)
    x, _ = held_out(reloaded.tokenizer)
    with torch.inference_mode():
        assert torch.equal(on_the_fly.model(x)[0], reloaded.model(x)[0])
    assert load_for_inference(saved[mode], quantize=mode).quantization == mode  # the same mode: nothing to do
    with pytest.raises(CheckpointError, match="already quantized"):
        load_for_inference(saved[mode], quantize="int8" if mode == "int4" else "int4")


def test_saved_checkpoint_is_verified_safetensors_without_pickle(trained, saved):
    for mode, directory in saved.items():
        manifest = verify_checkpoint(directory)
        assert set(manifest["files"]) == {"model.safetensors", "trainer_state.json", "config.yaml", "tokenizer.json"}
        for path in directory.iterdir():
            data = path.read_bytes()
            assert not data.startswith(b"\x80") and b"PK\x03\x04" not in data[:4]  # no pickle, no torch zip
            assert path.stat().st_mode & 0o077 == 0  # owner-only, as every checkpoint file
        state = json.loads((directory / "trainer_state.json").read_text())
        assert state["quantization"]["mode"] == mode
        assert state["quantized_from"]["path"] == str(trained.resolve())
    full_size = weight_bytes(trained)
    # This model's tied embedding (vocab 300 x 64) stays float32: a third of its weights.
    assert weight_bytes(saved["int8"]) < 0.5 * full_size
    assert weight_bytes(saved["int4"]) < 0.8 * weight_bytes(saved["int8"])


def rewrite(directory, dest, edit):
    """An attacker who rewrites the checkpoint and its manifest alike: a valid checkpoint."""
    ckpt = load_checkpoint(directory, load_optimizer=False)
    edit(ckpt)
    return save_checkpoint(dest, 0, ckpt)


W = "layers.1.feed_forward.w2.weight"


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.trainer_state["quantization"].update(mode="nf4"), "unknown quantization mode 'nf4'"),
    (lambda c: c.trainer_state["quantization"]["weights"][W].update(block_size=[1, 8]), f"entry of {W}"),
    (lambda c: c.trainer_state["quantization"]["weights"].pop(W), "lists 13 weights"),
    (lambda c: c.model.update({f"{W}.scale": c.model[f"{W}.scale"].double()}), f"{W}.scale is torch.float64"),
    (lambda c: c.model.update({f"{W}.extra": torch.zeros(1)}), f"unexpected {W}.extra"),
    (lambda c: c.model.update({f"{W}.scale": c.model[f"{W}.scale"] * float("nan")}), "contains NaN or Inf"),
])
def test_tampered_quantization_is_refused(saved, tmp_path, edit, match):
    bad = rewrite(saved["int4"], tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=match):
        load_for_inference(bad)


def test_training_merging_and_export_refuse_a_quantized_checkpoint(saved, tmp_path):
    with pytest.raises(CheckpointError, match=r"finetune.init_from .* is a quantized checkpoint \(int8 weights.*"
                                              r"inference only .* full-precision checkpoint it was made from"):
        load_full_model(saved["int8"], what="finetune.init_from")
    result = runner.invoke(app, ["export", "gguf", str(saved["int4"]), str(tmp_path / "m.gguf")])
    assert result.exit_code == 2 and "quantized checkpoint (int4 weights" in result.output
    result = runner.invoke(app, ["quantize", str(saved["int8"]), str(tmp_path / "again"), "--to", "int4"])
    assert result.exit_code == 2 and "quantized checkpoint" in result.output


def test_cli_quantize_generate_and_refusals(trained, tmp_path):
    result = runner.invoke(app, ["quantize", str(trained), str(tmp_path / "q"), "--to", "int4"])
    assert result.exit_code == 0, result.output
    assert "int4; weights" in result.output
    generated = runner.invoke(app, ["generate", "--checkpoint", str(tmp_path / "q"), "-p", "the cats",
                                    "--max-new-tokens", "8", "--temperature", "0", "--json"])
    assert generated.exit_code == 0, generated.output
    on_the_fly = runner.invoke(app, ["generate", "--checkpoint", str(trained), "-p", "the cats",
                                     "--max-new-tokens", "8", "--temperature", "0", "--json", "--quantize", "int4"])
    assert json.loads(on_the_fly.output) == json.loads(generated.output)
    assert "Failed to load" not in on_the_fly.output  # torchao's import warnings are kept out
    for args in (["generate", "--checkpoint", str(trained), "-p", "x", "--quantize", "int3"],
                 ["eval", "loss", "--checkpoint", str(trained), "--file", "x.jsonl", "--quantize", "fp8"],
                 ["serve", "--checkpoint", str(trained), "--quantize", "nf4"],
                 ["quantize", str(trained), str(tmp_path / "q2"), "--to", "int2"]):
        result = runner.invoke(app, args)
        message = " ".join(result.output.replace("│", " ").split())  # click's error box, unwrapped
        assert result.exit_code == 2 and f"'{args[-1]}' is not one of 'int8', 'int4'" in message, args
    result = runner.invoke(app, ["quantize", str(trained), str(tmp_path / "q"), "--to", "int8"])
    assert result.exit_code == 2 and "not an empty folder" in result.output


def test_eval_runs_on_the_quantized_model(trained, tmp_path, monkeypatch):
    from bastion.eval.finetune import eval_generate, eval_loss

    monkeypatch.chdir(tmp_path)
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps({"messages": [
        {"role": "user", "content": d.split(".")[0]}, {"role": "assistant", "content": d}]})
        for d in grammar_documents(8, seed=5)) + "\n")
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"prompt": " ".join(d.split()[:3]), "answer": d})
                                                    for d in grammar_documents(4, seed=6)) + "\n")
    full = eval_loss(trained, "chat.jsonl")
    for mode in ("int8", "int4"):
        quantized = eval_loss(trained, "chat.jsonl", quantize=mode)
        assert quantized["examples"] == full["examples"] == 8
        assert abs(quantized["loss"] - full["loss"]) < 0.05 * full["loss"]
        result = eval_generate(trained, "prompts.jsonl", [{"name": "exact"}], quantize=mode, max_new_tokens=8)
        assert result.n == 4
