"""`bastion import hf`: random-initialised transformers models (no download), saved as local
folders, imported, and compared logit for logit; plus every refusal the importer promises."""
import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from bastion.checkpoint import load_checkpoint
from bastion.errors import CheckpointError
from bastion.checkpoint.contents import load_full_model, read_trainer_state, special_tokens
from bastion.interop import import_hf
from bastion.model import Transformer
from bastion.model.hf import (
    bastion_name,
    hf_config_from_model_config,
    hf_name,
    model_config_from_hf_config,
)

TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, hello bastion", "1 + 2 = 3; 4 * 5 = 20"] * 30


def write_tokenizer(folder, specials=("<s>", "</s>"), vocab=300, chat_template=TEMPLATE, eos="</s>", bos="<s>", pad=None):
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json) with HF-style specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab, special_tokens=list(specials), show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": {"content": eos},
              "pad_token": pad}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


def hf_model(arch, vocab=300, tie=False, seed=0, **extra):
    torch.manual_seed(seed)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    cfg = config_cls(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, rms_norm_eps=1e-5,
                     tie_word_embeddings=tie, attn_implementation="eager", **extra)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms (ones) and biases (zeros): randomise so a mix-up shows
                p.add_(torch.randn_like(p) * 0.2)
    return model


def save_hf(model, folder, **kwargs):
    model.save_pretrained(folder, **kwargs)
    return folder


def our_logits(ckpt_dir, ids, **kw):
    ckpt, config = load_full_model(ckpt_dir)
    cfg = config.model
    model = Transformer(cfg).eval()
    model.load_state_dict(ckpt.model)
    with torch.no_grad():
        return model(ids, **kw)[0], model


LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES = {
    "llama-tied-llama3": ("llama", {"tie": True, "rope_parameters": LLAMA3}),
    "llama-untied-linear": ("llama", {"tie": False, "rope_parameters": {"rope_type": "linear", "rope_theta": 5000.0, "factor": 2.5}}),
    "mistral-sliding": ("mistral", {"sliding_window": 7}),
    "qwen2-tied-bias-padded-vocab": ("qwen2", {"tie": True, "vocab": 320}),
    "qwen2-untied": ("qwen2", {"tie": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    arch, kw = CASES[case]
    model = hf_model(arch, **kw)
    folder = save_hf(model, tmp_path / "hf")
    write_tokenizer(folder)
    out = import_hf(folder, tmp_path / "ckpt")
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    ours, our_model = our_logits(out, ids)
    with torch.no_grad():
        theirs = model(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
    cfg = our_model.cfg
    assert cfg.tie_embeddings == model.config.tie_word_embeddings
    assert cfg.qkv_bias == (arch == "qwen2")
    if arch == "mistral":
        assert cfg.sliding_window == 7
        # Cached decoding (prefill + one token at a time) sees the same window.
        cache = our_model.new_cache(2)
        with torch.no_grad():
            steps = [our_model(ids[:, :5], cache=cache)[0]]
            steps += [our_model(ids[:, t:t + 1], cache=cache, start_pos=t)[0] for t in range(5, 40)]
        assert (torch.cat(steps, dim=1) - theirs).abs().max().item() <= 1e-4
    state = load_checkpoint(out).trainer_state
    assert state["step"] == 0 and state["imported_from"] == arch
    assert read_trainer_state(out)["chat_template"] == TEMPLATE
    assert special_tokens(read_trainer_state(tmp_path / "ckpt")) == {"bos_token": "<s>", "eos_token": "</s>", "pad_token": None}


def test_sharded_folder_and_sliding_window_with_packing(tmp_path):
    model = hf_model("mistral", sliding_window=5)
    folder = save_hf(model, tmp_path / "hf", max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").exists() and not (folder / "model.safetensors").exists()
    write_tokenizer(folder, chat_template=None)
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")  # where transformers v5 saves it
    out = import_hf(folder, tmp_path / "ckpt")
    assert read_trainer_state(out)["chat_template"] == "{{ messages[0]['content'] }}"
    a = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_a, ref_b = model(a).logits, model(b).logits
    # Two documents packed in one row: each still sees only itself, windowed.
    packed, _ = our_logits(out, torch.cat([a, b], 1), segment_ids=torch.tensor([[0] * 12 + [1] * 9]))
    assert (packed[:, :12] - ref_a).abs().max().item() <= 1e-4
    assert (packed[:, 12:] - ref_b).abs().max().item() <= 1e-4


def test_bastion_tokenizer_checkpoint_loads_for_inference(tmp_path):
    """With Bastion's own specials (<|endoftext|>, <|pad|>) the import is usable as-is."""
    from bastion.infer.loading import load_for_inference

    model = hf_model("qwen2")
    folder = save_hf(model, tmp_path / "hf")
    write_tokenizer(folder, specials=("<|endoftext|>", "<|pad|>"), chat_template=None, eos="<|endoftext|>",
                    bos=None, pad="<|pad|>")
    loaded = load_for_inference(import_hf(folder, tmp_path / "ckpt"))
    ids = torch.tensor([loaded.tokenizer.encode("hello world")])
    with torch.no_grad():
        assert (loaded.model(ids)[0] - model(ids).logits).abs().max().item() <= 1e-4
    assert "chat_template" not in read_trainer_state(tmp_path / "ckpt")


@pytest.mark.parametrize("adds_bos", [True, False])
def test_plain_prompts_start_with_bos_when_the_tokenizer_adds_it(tmp_path, adds_bos):
    """Llama / Mistral tokenizers put bos before every text (their post-processor); the
    model expects it. A plain-text prompt gets it too, so greedy generation equals
    transformers' generate() on tokenizer(text); a tokenizer without that post-processor
    (Qwen2, Bastion's own) gets none."""
    from tokenizers import processors

    from bastion.config.schema import GenerateConfig
    from bastion.infer.generate import generate
    from bastion.infer.loading import load_for_inference

    model = hf_model("llama")
    folder = save_hf(model, tmp_path / "hf")
    tok = write_tokenizer(folder)
    if adds_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos)])
        tok.save(str(folder / "tokenizer.json"))
    loaded = load_for_inference(import_hf(folder, tmp_path / "ckpt"))
    text = "hello world"
    ids = loaded.tokenizer.encode_prompt(text)
    assert loaded.tokenizer.adds_bos is adds_bos
    assert ids == tok.encode(text).ids  # what the tokenizer itself gives, specials included
    assert (ids[0] == tok.token_to_id("<s>")) is adds_bos
    ours = generate(loaded.model, loaded.tokenizer, text, max_new_tokens=8, temperature=0.0,
                    limits=GenerateConfig())
    with torch.no_grad():
        theirs = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=8, do_sample=False, eos_token_id=None,
                                pad_token_id=tok.token_to_id("</s>"))[0, len(ids):].tolist()
    assert ours.prompt_tokens == len(ids) and ours.token_ids and ours.token_ids == theirs[:len(ours.token_ids)]


def test_name_map_round_trips():
    assert hf_name("layers.3.attention.wq") == "model.layers.3.self_attn.q_proj"
    assert hf_name("layers.0.feed_forward.w2.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    cfg = model_config_from_hf_config(hf_model("llama").config.to_dict())
    for name in Transformer(cfg).state_dict():
        assert bastion_name(hf_name(name)) == name
    with pytest.raises(KeyError):
        hf_name("layers.0.attention.rope")


def test_config_round_trip_and_v4_rope_keys():
    cfg = model_config_from_hf_config({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128, "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
    })
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling.type == "llama3" and cfg.kv_heads == 2
    assert model_config_from_hf_config(hf_config_from_model_config(cfg)) == cfg


# ---- refusals ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = save_hf(hf_model("llama"), tmp_path_factory.mktemp("base") / "hf")
    write_tokenizer(folder)
    return folder


@pytest.fixture
def folder(llama_folder, tmp_path):
    copy = tmp_path / "hf"
    shutil.copytree(llama_folder, copy)
    return copy


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def resave(folder, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def refused(folder, tmp_path, match):
    with pytest.raises(CheckpointError, match=match):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_remote_code(folder, tmp_path):
    edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_evil.EvilModel"})
    refused(folder, tmp_path, "auto_map")


@pytest.mark.parametrize("changes, match", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, "rope scaling type 'yarn'"),
    ({"num_attention_heads": 3}, "head_dim"),
    ({"num_key_value_heads": 3}, "cannot be expressed"),
])
def test_refuses_unsupported_configs(folder, tmp_path, changes, match):
    edit_config(folder, **changes)
    refused(folder, tmp_path, match)


def test_refuses_qwen2_partial_sliding_window(tmp_path):
    config = hf_model("qwen2").config.to_dict()
    config.update(use_sliding_window=True, sliding_window=4, layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(CheckpointError, match="some layers only"):
        model_config_from_hf_config(config)
    config["layer_types"] = ["sliding_attention"] * 2
    assert model_config_from_hf_config(config).sliding_window == 4
    config["use_sliding_window"] = False
    assert model_config_from_hf_config(config).sliding_window is None


def test_smollm3_only_with_rope_on_every_layer(tmp_path):
    """SmolLM3 is what `export hf` writes for a sliding window with qkv biases; real SmolLM3
    models leave RoPE out of every 4th layer, which Bastion cannot compute."""
    config = transformers.SmolLM3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=300).to_dict()
    with pytest.raises(CheckpointError, match="no_rope_layers"):
        model_config_from_hf_config(config)
    config.update(no_rope_layers=[1] * 4, attention_bias=True, use_sliding_window=True, sliding_window=8,
                  layer_types=["sliding_attention"] * 4)
    cfg = model_config_from_hf_config(config)
    assert (cfg.qkv_bias, cfg.sliding_window, cfg.tie_embeddings) == (True, 8, True)
    config["layer_types"] = ["full_attention", "sliding_attention"] * 2
    with pytest.raises(CheckpointError, match="some layers only"):
        model_config_from_hf_config(config)
    del config["tie_word_embeddings"], config["layer_types"]  # SmolLM3's defaults: tied, windows on NoPE layers only
    cfg = model_config_from_hf_config(config)
    assert cfg.tie_embeddings and cfg.sliding_window is None


def test_refuses_pickle_only_folder(folder, tmp_path):
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not even read")
    refused(folder, tmp_path, r"pickle-format weights .*bastion ckpt convert --allow-pickle")


@pytest.mark.parametrize("edit, match", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing tensor.*layers.1.mlp.up_proj"),
    (lambda t: t.update({"model.layers.0.self_attn.evil": torch.zeros(2)}), "unexpected tensor.*evil"),
    (lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)}), "unexpected tensor.*layers.2"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(65)}), r"model.norm.weight has shape \(65,\)"),
    (lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int32)}), "floating point"),
    (lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.ones(64)}), "non-zero o_proj bias"),
    (lambda t: t.pop("lm_head.weight"), "missing tensor.*lm_head"),
])
def test_refuses_tensor_mismatches(folder, tmp_path, edit, match):
    resave(folder, edit)
    refused(folder, tmp_path, match)


def test_refuses_tied_config_with_a_different_lm_head(folder, tmp_path):
    edit_config(folder, tie_word_embeddings=True)  # the saved model is untied: its lm_head differs
    refused(folder, tmp_path, "ties embeddings but lm_head.weight differs")


def test_refuses_corrupt_safetensors_header(folder, tmp_path):
    data = bytearray((folder / "model.safetensors").read_bytes())
    (folder / "model.safetensors").write_bytes(bytes(data[:-4]))  # truncated: offsets past the end
    refused(folder, tmp_path, "outside the|trailing|offsets")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", ".hidden.safetensors"])
def test_refuses_shard_names_outside_the_folder(folder, tmp_path, shard):
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    index = {"metadata": {}, "weight_map": {"model.norm.weight": shard,
                                            "model.embed_tokens.weight": "model-00001-of-00001.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(folder, tmp_path, "not a plain file name|not a .safetensors")


def test_refuses_symlink_out_of_the_folder(folder, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(folder / "tokenizer.json", outside)
    (folder / "tokenizer.json").symlink_to(outside)
    refused(folder, tmp_path, "symbolic link leading outside")


def test_follows_hugging_face_cache_links(llama_folder, tmp_path):
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(llama_folder.iterdir())):
        shutil.copy(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    assert load_checkpoint(import_hf(snapshot, tmp_path / "out")).trainer_state["imported_from"] == "llama"


def test_refuses_missing_tokenizer_and_bad_special_token(folder, tmp_path):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<|im_end|>"}))
    refused(folder, tmp_path, "eos_token '<|im_end|>' is not in")
    (folder / "tokenizer.json").unlink()
    refused(folder, tmp_path, "tokenizer.json.* is missing")


def test_refuses_tokenizer_larger_than_the_model_vocab(folder, tmp_path):
    edit_config(folder, vocab_size=200)
    refused(folder, tmp_path, "300 tokens but the model's vocab_size is 200|do not match")


def test_refuses_non_empty_output(folder, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not an empty folder"):
        import_hf(folder, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# ---- every file read stays inside the folder, or inside a checked cache layout ------------

SECRET = "aws_secret_access_key = do-not-import-me"


def cache_layout(llama_folder, root, blob_of=lambda name: name):
    """A huggingface_hub cache repo: root/blobs/<blob> files, root/snapshots/rev/<name> ->
    ../../blobs/<blob> links. Returns the snapshot folder."""
    snapshot = root / "snapshots" / "rev"
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(llama_folder.iterdir()):
        shutil.copy(f, root / "blobs" / blob_of(f.name))
        (snapshot / f.name).symlink_to(f"../../blobs/{blob_of(f.name)}")
    return snapshot


def without_template(snapshot):
    """The snapshot's tokenizer_config.json (a blob) without its chat_template, so that
    chat_template.jinja is read."""
    path = snapshot / "tokenizer_config.json"
    config = json.loads(path.read_text())
    del config["chat_template"]
    path.resolve().write_text(json.dumps(config))


def private_file(tmp_path):
    private = tmp_path / "private"
    private.mkdir()
    (private / "credentials").write_text(SECRET)
    return private


def refused_cli(snapshot, tmp_path, match):
    """Exit 2, one line naming the problem, nothing written, the secret nowhere."""
    import re

    from typer.testing import CliRunner

    from bastion.cli import app

    result = CliRunner().invoke(app, ["import", "hf", str(snapshot), str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert re.search(match, result.output.replace("\n", "")), result.output
    assert SECRET not in result.output and not (tmp_path / "out").exists()


def test_refuses_a_blobs_folder_linked_out_of_the_cache(llama_folder, tmp_path):
    """The reported attack: blobs -> a private folder, chat_template.jinja -> ../../blobs/credentials."""
    repo = tmp_path / "models--org--evil"
    snapshot = cache_layout(llama_folder, repo)
    without_template(snapshot)
    private = private_file(tmp_path)
    for blob in (repo / "blobs").iterdir():  # the model files sit in the private folder too
        shutil.move(blob, private / blob.name)
    (repo / "blobs").rmdir()
    (repo / "blobs").symlink_to(private)
    (snapshot / "chat_template.jinja").symlink_to("../../blobs/credentials")
    refused_cli(snapshot, tmp_path, "cache folder 'blobs'.*symbolic link")
    # Every other way out: a blob that is a link out, '..' past the cache, an absolute link.
    (repo / "blobs").unlink()
    shutil.copytree(private, repo / "blobs")
    (repo / "blobs" / "credentials").unlink()
    (repo / "blobs" / "credentials").symlink_to(private / "credentials")
    refused_cli(snapshot, tmp_path, "blob ../../blobs/credentials is itself a symbolic link")
    for link in ("../../../private/credentials", "../../blobs/../../private/credentials", str(private / "credentials")):
        (snapshot / "chat_template.jinja").unlink()
        (snapshot / "chat_template.jinja").symlink_to(link)
        refused_cli(snapshot, tmp_path, "chat_template.jinja: is a symbolic link leading outside the model folder")


def test_refuses_a_chain_of_links_inside_the_cache(llama_folder, tmp_path):
    repo = tmp_path / "models--org--chain"
    snapshot = cache_layout(llama_folder, repo)
    (repo / "blobs" / "hop").symlink_to("config.json")  # a blob linking to another blob
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to("../../blobs/hop")
    refused_cli(snapshot, tmp_path, "itself a symbolic link")
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to("tokenizer.json")  # a link to a link beside it
    refused_cli(snapshot, tmp_path, "leading outside the model folder")


def test_refuses_cache_links_outside_a_snapshots_folder(llama_folder, tmp_path):
    """NAME -> ../../blobs/x is the cache's link only where the folder is <repo>/snapshots/<rev>."""
    repo = tmp_path / "models--org--fake"
    cache_layout(llama_folder, repo)
    (repo / "snapshots").rename(repo / "elsewhere")
    refused_cli(repo / "elsewhere" / "rev", tmp_path, "not a Hugging Face cache snapshot")


def test_only_regular_files_are_read(llama_folder, tmp_path):
    """A dangling link, a FIFO (never waited on) or a folder is refused by name. A hard link
    is the file itself, not a pointer the importer could be led along (making one already
    needs access to the file), so it is read like any other file."""
    repo = tmp_path / "models--org--odd"
    snapshot = cache_layout(llama_folder, repo)
    (repo / "blobs" / "tokenizer.json").unlink()
    refused_cli(snapshot, tmp_path, "tokenizer.json: missing")
    shutil.copy(llama_folder / "tokenizer.json", repo / "blobs" / "tokenizer.json")
    os.mkfifo(repo / "blobs" / "model.safetensors.fifo")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to("../../blobs/model.safetensors.fifo")
    refused_cli(snapshot, tmp_path, "model.safetensors: not a regular file")
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in llama_folder.iterdir():
        os.link(f, plain / f.name)
    assert load_checkpoint(import_hf(plain, tmp_path / "linked")).trainer_state["imported_from"] == "llama"
    (plain / "tokenizer_config.json").unlink()
    os.mkfifo(plain / "chat_template.jinja")
    refused_cli(plain, tmp_path, "chat_template.jinja: not a regular file")
    (plain / "chat_template.jinja").unlink()
    (plain / "config.json").unlink()
    (plain / "config.json").mkdir()
    refused_cli(plain, tmp_path, "config.json: not a regular file")
