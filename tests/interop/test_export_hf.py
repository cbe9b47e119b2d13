"""`bastion export hf`: the folder loads offline in transformers (AutoModelForCausalLM,
AutoTokenizer) with equal logits and token ids, and import(export(ckpt)) gives back the weights."""
import json
import os
import stat

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner

from bastion.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from bastion.config import build_config, to_yaml
from bastion.errors import CheckpointError
from bastion.checkpoint.contents import read_trainer_state
from bastion.interop import export_hf, import_hf
from bastion.model import Transformer
from bastion.tokenizer import BastionTokenizer

TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, hello bastion", "1 + 2 = 3; 4 * 5 = 20"] * 30
SAMPLE = "hello world, the lazy fox: 1 + 2 = 3 ünïcödé ☃\n  end"


@pytest.fixture(scope="module")
def tokenizer():
    return BastionTokenizer.train(TEXT, vocab_size=300)


def make_checkpoint(root, tokenizer, seed=0, **model):
    """A random Bastion checkpoint (norms randomised too) as training would save it."""
    torch.manual_seed(seed)
    settings = {"vocab_size": tokenizer.vocab_size, "n_layer": 2, "n_head": 4, "n_kv_head": 2, "d_model": 64,
                "d_ff": 96, "max_seq_len": 64, **model}
    config = build_config({"model": settings, "train": {"seq_len": 64}})
    net = Transformer(config.model)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    ckpt = Checkpoint(model=net.state_dict(), trainer_state={"step": 7}, config_yaml=to_yaml(config),
                      tokenizer_json=tokenizer.to_json_str())
    return save_checkpoint(root, 7, ckpt), net.eval()


LLAMA3 = {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CASES = {
    "llama-tied": ({}, "LlamaForCausalLM"),
    # qkv biases: Llama's attention_bias with zero o_proj biases (see hf_model_type for why not Qwen2)
    "llama-bias-untied-llama3": ({"qkv_bias": True, "tie_embeddings": False, "rope_scaling": LLAMA3}, "LlamaForCausalLM"),
    "mistral-window-linear": ({"sliding_window": 6, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 500.0},
                              "MistralForCausalLM"),
    "qwen2-window-bias": ({"sliding_window": 5, "qkv_bias": True}, "Qwen2ForCausalLM"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_export_with_equal_logits(tmp_path, tokenizer, case):
    settings, architecture = CASES[case]
    ckpt_dir, ours = make_checkpoint(tmp_path / "run", tokenizer, **settings)
    out = export_hf(ckpt_dir, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == architecture
    ids = torch.randint(0, tokenizer.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids)[0] - hf(ids).logits).abs().max().item() <= 1e-4

    if architecture == "Qwen2ForCausalLM":
        # transformers v5 forces Qwen2's own pre-tokenizer on model_type qwen2 folders;
        # the tokenizer.json itself is exact (loaded as written).
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"), eos_token="<|endoftext|>",
                                                      pad_token="<|pad|>")
    else:
        hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok(SAMPLE, add_special_tokens=False).input_ids == tokenizer.encode(SAMPLE)
    assert hf_tok(SAMPLE).input_ids == tokenizer.encode(SAMPLE)  # nothing added: Bastion uses no bos
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tokenizer.eos_id
    assert hf_tok.pad_token_id == tokenizer.pad_id
    assert hf.config.eos_token_id == tokenizer.eos_id
    assert hf.generation_config.eos_token_id == tokenizer.eos_id

    # Round trip: importing the export gives back exactly the checkpoint's weights.
    back = load_checkpoint(import_hf(out, tmp_path / "back"))
    original = load_checkpoint(ckpt_dir).model
    assert back.model.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(back.model[name], tensor), name
    assert back.trainer_state["imported_from"] == architecture.removesuffix("ForCausalLM").lower()


def test_files_private_and_write_atomic(tmp_path, tokenizer):
    ckpt_dir, _ = make_checkpoint(tmp_path / "run", tokenizer)
    out = export_hf(ckpt_dir, tmp_path / "hf")
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert all(stat.S_IMODE((out / n).stat().st_mode) == 0o600 for n in names)
    with pytest.raises(CheckpointError, match="not an empty folder"):
        export_hf(ckpt_dir, out)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_export_of_an_import_keeps_chat_template_and_specials(tmp_path):
    """HF folder (Llama-style specials, chat template) -> import -> export -> AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    template = "{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}"
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                   vocab_size=300, max_position_embeddings=64, tie_word_embeddings=True)
    src = tmp_path / "src"
    transformers.LlamaForCausalLM(cfg).save_pretrained(src)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "chat_template": template}))
    ckpt = import_hf(src, tmp_path / "ckpt")
    out = export_hf(ckpt, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok.eos_token == "</s>" and hf_tok.bos_token == "<s>" and hf_tok.pad_token is None
    assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>hi</s>"
    assert read_trainer_state(import_hf(out, tmp_path / "again"))["chat_template"] == template
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.token_to_id("<s>"), tok.token_to_id("</s>"))


def test_cli_commands(tmp_path, tokenizer):
    import typer

    from bastion.cli import _BastionGroup
    from bastion.interop.cli import export_app, import_app

    app = typer.Typer(cls=_BastionGroup)
    app.add_typer(import_app, name="import")
    app.add_typer(export_app, name="export")
    make_checkpoint(tmp_path / "run", tokenizer)
    runner = CliRunner()
    result = runner.invoke(app, ["export", "hf", str(tmp_path / "run"), str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["import", "hf", str(tmp_path / "hf"), str(tmp_path / "back")])
    assert result.exit_code == 0 and "step_00000000" in result.output, result.output
    result = runner.invoke(app, ["export", "gguf", str(tmp_path / "back"), str(tmp_path / "m.gguf"), "--dtype", "f32"])
    assert result.exit_code == 0 and (tmp_path / "m.gguf").is_file(), result.output
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {}}))
    result = runner.invoke(app, ["import", "hf", str(tmp_path / "evil"), str(tmp_path / "x")])
    assert result.exit_code == 2 and "auto_map" in result.output and "Traceback" not in result.output


def test_imported_qwen2_exports_as_qwen2(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=tokenizer.vocab_size, max_position_embeddings=64)
    original = transformers.Qwen2ForCausalLM(cfg).eval()
    original.save_pretrained(tmp_path / "src")
    tokenizer.save(tmp_path / "src" / "tokenizer.json")
    out = export_hf(import_hf(tmp_path / "src", tmp_path / "ckpt"), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "Qwen2ForCausalLM"
    ids = torch.randint(0, tokenizer.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - original(ids).logits).abs().max().item() <= 1e-5
