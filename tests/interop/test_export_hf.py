"""`bastion export hf`: the folder loads offline in transformers (AutoModelForCausalLM,
AutoTokenizer) with equal logits and token ids for every model configuration Bastion trains,
generate() defaults to what `bastion generate` does, and import(export(ckpt)) gives back
the weights. Chat templates: test_export_chat.py."""
import json
import os
import stat

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner

from bastion.checkpoint import load_checkpoint
from bastion.errors import CheckpointError
from bastion.checkpoint.contents import checkpoint_config, checkpoint_tokenizer, read_trainer_state
from bastion.infer import generate
from bastion.interop import export_hf, import_hf
from exports import TEXT, bastion_tokenizer, imported_state, make_checkpoint, qwen_style_tokenizer

SAMPLE = "hello world, the lazy fox: 1 + 2 = 3 ünïcödé ☃\n  end"
# Where tokenizers part ways: digit runs (Qwen2 splits digits one by one), whitespace and
# newline runs, decomposed accents (NFC), special-token text inside text.
TEXTS = [SAMPLE, "in 2024 there were 12345 of them, 100 / 4 = 25", "  two\n\n\nthree   spaces\t\ttabs  ",
         "def f(x):\n    return x", "e\u0301te\u0301 ☃ ünïcödé", "it's they'll WE'VE", "x <|endoftext|> y<|pad|>z<|im_end|>"]


@pytest.fixture(scope="module")
def tokenizer():
    return bastion_tokenizer()


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return qwen_style_tokenizer()


LLAMA3 = {"type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CASES = {
    "llama-tied": ({}, "LlamaForCausalLM"),
    # qkv biases: Llama's attention_bias with zero o_proj biases (see hf_model_type for why not Qwen2)
    "llama-bias-untied-llama3": ({"qkv_bias": True, "tie_embeddings": False, "rope_scaling": LLAMA3}, "LlamaForCausalLM"),
    "mistral-window-linear": ({"sliding_window": 6, "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 500.0},
                              "MistralForCausalLM"),
    # window + qkv biases: SmolLM3 (RoPE on every layer, every layer sliding); Qwen2 would
    # make AutoTokenizer rebuild the tokenizer with Qwen2's split (see hf_model_type)
    "smollm3-window-bias": ({"sliding_window": 5, "qkv_bias": True}, "SmolLM3ForCausalLM"),
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
    """HF folder (Llama-style specials, a post-processor that adds bos, chat template) ->
    import -> export -> AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

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
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "chat_template": template}))
    ckpt = import_hf(src, tmp_path / "ckpt")
    out = export_hf(ckpt, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok.eos_token == "</s>" and hf_tok.bos_token == "<s>" and hf_tok.pad_token is None
    assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<s>hi</s>"
    ours = checkpoint_tokenizer(load_checkpoint(ckpt))
    assert ours.adds_bos and json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True
    for text in TEXTS:
        assert hf_tok(text, split_special_tokens=True).input_ids == ours.encode_prompt(text)  # bos first
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


@pytest.mark.parametrize("qwen_tokenizer_kept", [True, False])
def test_imported_qwen2_stays_qwen2_only_with_a_tokenizer_qwen2tokenizer_rebuilds(tmp_path, tokenizer, qwen_tokenizer,
                                                                                   qwen_tokenizer_kept):
    ours = qwen_tokenizer if qwen_tokenizer_kept else tokenizer
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=ours.vocab_size, max_position_embeddings=64)
    original = transformers.Qwen2ForCausalLM(cfg).eval()
    original.save_pretrained(tmp_path / "src")
    ours.save(tmp_path / "src" / "tokenizer.json")
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({"eos_token": ours.eos_token}))
    out = export_hf(import_hf(tmp_path / "src", tmp_path / "ckpt"), tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == ("Qwen2ForCausalLM" if qwen_tokenizer_kept else "LlamaForCausalLM")
    ids = torch.randint(0, ours.vocab_size, (1, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - original(ids).logits).abs().max().item() <= 1e-5
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert type(hf_tok).__name__ == ("Qwen2Tokenizer" if qwen_tokenizer_kept else "TokenizersBackend")
    for text in TEXTS:
        assert hf_tok(text, split_special_tokens=True).input_ids == ours.encode(text), text


def _expected_architecture(window: bool, bias: bool, imported: bool) -> str:
    if bias and imported:
        return "Qwen2ForCausalLM"
    if window:
        return "SmolLM3ForCausalLM" if bias else "MistralForCausalLM"
    return "LlamaForCausalLM"


@pytest.mark.parametrize("imported", [False, True], ids=["bastion", "from-qwen2"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("window", [False, True], ids=["full", "window"])
def test_autotokenizer_ids_equal_bastion_for_every_trainable_config(tmp_path, tokenizer, qwen_tokenizer, window, bias,
                                                                    tied, imported):
    """sliding window x qkv bias x tied x imported from Qwen2 (its own tokenizer) or Bastion's."""
    ours = qwen_tokenizer if imported else tokenizer
    ckpt_dir, _ = make_checkpoint(tmp_path / "run", ours, trainer_state=imported_state(ours) if imported else None,
                                  sliding_window=5 if window else None, qkv_bias=bias, tie_embeddings=tied)
    out = export_hf(ckpt_dir, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == [_expected_architecture(window, bias, imported)]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert len(hf_tok) == ours.vocab_size  # nothing added on load
    for text in TEXTS:
        # split_special_tokens: text that merely contains "<|endoftext|>" stays text, as in Bastion
        assert hf_tok(text, split_special_tokens=True).input_ids == ours.encode_prompt(text), text
        assert hf_tok.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    # transformers' default (needed by apply_chat_template) reads special-token text as the special token
    assert ours.eos_id in hf_tok("x <|endoftext|> y").input_ids and ours.eos_id not in ours.encode("x <|endoftext|> y")


def test_qwen2_pipeline_check_needs_every_part(qwen_tokenizer, tokenizer):
    from bastion.interop.hf import qwen2_tokenizer_rebuilds

    assert qwen2_tokenizer_rebuilds(qwen_tokenizer.to_json_str())
    assert not qwen2_tokenizer_rebuilds(tokenizer.to_json_str())  # GPT-2 split inside ByteLevel
    for path, value in ((("normalizer",), None), (("pre_tokenizer", "pretokenizers", 0, "pattern", "Regex"), r"\s+"),
                        (("pre_tokenizer", "pretokenizers", 1, "use_regex"), True), (("model", "ignore_merges"), True)):
        changed = json.loads(qwen_tokenizer.to_json_str())
        *parents, last = path
        target = changed
        for key in parents:
            target = target[key]
        target[last] = value
        assert not qwen2_tokenizer_rebuilds(json.dumps(changed)), path


# ---- generation_config.json: what `bastion generate` does with the checkpoint ----------------

def _generation(out):
    return json.loads((out / "generation_config.json").read_text())


def _limits(ckpt_dir):
    """The checkpoint's generate: section: what `bastion generate` uses when a request sets nothing."""
    return checkpoint_config(load_checkpoint(ckpt_dir)).generate


def test_generation_config_samples_like_bastion_by_default(tmp_path, tokenizer):
    ckpt_dir, _ = make_checkpoint(tmp_path / "run", tokenizer)
    limits = _limits(ckpt_dir)
    assert (limits.temperature, limits.top_k, limits.top_p) == (0.8, 50, 1.0)  # Bastion's defaults: sampling
    assert _generation(export_hf(ckpt_dir, tmp_path / "hf")) == {
        "bos_token_id": None, "pad_token_id": tokenizer.pad_id, "eos_token_id": tokenizer.eos_id,
        "max_length": 64, "do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 1.0}  # 64: the context


def test_generation_config_follows_the_checkpoints_generate_section(tmp_path, tokenizer):
    ckpt_dir, _ = make_checkpoint(tmp_path / "nocut", tokenizer, sections={"generate": {"top_k": None, "top_p": 0.9}})
    gen = _generation(export_hf(ckpt_dir, tmp_path / "hf_nocut"))
    assert (gen["do_sample"], gen["top_k"], gen["top_p"]) == (True, 0, 0.9)  # 0: transformers' "no top-k cut"

    ckpt_dir, ours = make_checkpoint(tmp_path / "greedy", tokenizer,
                                     sections={"generate": {"temperature": 0.0, "max_new_tokens": 6}})
    out = export_hf(ckpt_dir, tmp_path / "hf_greedy")
    assert _generation(out)["do_sample"] is False and "temperature" not in _generation(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    prompt = tokenizer.encode("hello world")
    expected = generate(ours, tokenizer, prompt, limits=_limits(ckpt_dir)).token_ids
    mask = torch.ones(1, len(prompt), dtype=torch.long)
    with torch.no_grad():  # greedy with no sampling arguments: the same continuation
        produced = hf.generate(torch.tensor([prompt]), attention_mask=mask, max_new_tokens=6)
    new = produced[0, len(prompt):].tolist()
    assert new == expected or new == [*expected, tokenizer.eos_id]
    with torch.no_grad():  # a caller's max_length holds (lm-eval's hf model passes context + max_gen_toks)
        short = hf.generate(torch.tensor([prompt]), attention_mask=mask, max_length=len(prompt) + 2,
                            eos_token_id=None)
        plain = hf.generate(torch.tensor([prompt]), attention_mask=mask, eos_token_id=None)
    assert short.shape[1] == len(prompt) + 2 and short[0].tolist() == plain[0, :len(prompt) + 2].tolist()
    assert plain.shape[1] == 64  # no arguments: up to the model's context
