"""Exports carry the chat template the model was trained with: transformers'
apply_chat_template on the `export hf` folder gives the ids Bastion's ChatFormat trained on,
and the GGUF file holds the same template text - for Bastion's built-in template and for an
imported ChatML one. Also pinned: the two documented cases where the ids differ."""
import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from bastion.checkpoint import load_checkpoint
from bastion.checkpoint.contents import checkpoint_chat, checkpoint_tokenizer
from bastion.interop import export_hf, import_hf
from bastion.tokenizer.chat import DEFAULT_CHAT_TEMPLATE
from exports import bastion_tokenizer, make_checkpoint, qwen_style_tokenizer

CHATML = (  # Qwen2.5's shape: a default system message, <|im_end|> closes every turn
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "hello world"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 12345 + 1?"}],
    [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello! how can I help?"},
     {"role": "user", "content": "tell me about ünïcödé e\u0301te\u0301 ☃"}],
    [{"role": "system", "content": "you are a\nhelpful bot"}, {"role": "user", "content": "def f(x):\n    return x\nok?"},
     {"role": "assistant", "content": " it returns x.\n\n"}, {"role": "user", "content": "thanks  "}],
]


def _chat_export(tmp_path, kind):
    """(export folder, ChatFormat, checkpoint dir): a Bastion-trained checkpoint (built-in
    template), or a Qwen2 folder with a ChatML template imported through `import hf`."""
    if kind == "bastion":
        ckpt_dir, _ = make_checkpoint(tmp_path / "run", bastion_tokenizer())
    else:
        tok = qwen_style_tokenizer()
        cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=tok.vocab_size, max_position_embeddings=64)
        transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "src")
        tok.save(tmp_path / "src" / "tokenizer.json")
        (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                                            "chat_template": CHATML}))
        ckpt_dir = import_hf(tmp_path / "src", tmp_path / "ckpt")
    ckpt = load_checkpoint(ckpt_dir)
    return export_hf(ckpt_dir, tmp_path / "hf"), checkpoint_chat(ckpt, checkpoint_tokenizer(ckpt)), ckpt_dir


def _hf_ids(hf_tok, messages, **kwargs):
    return hf_tok.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"]


@pytest.mark.parametrize("kind", ["bastion", "chatml"])
def test_apply_chat_template_gives_chatformat_ids(tmp_path, kind):
    out, chat, _ = _chat_export(tmp_path, kind)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok.chat_template == (DEFAULT_CHAT_TEMPLATE if kind == "bastion" else CHATML)
    for messages in CONVERSATIONS:
        assert _hf_ids(hf_tok, messages, add_generation_prompt=True) == chat.encode_prompt(messages), messages
        full = [*messages, {"role": "assistant", "content": "sure: 2024 items,\n  listed"}]
        assert _hf_ids(hf_tok, full) == chat.encode_conversation(full)[0], messages
        assert hf_tok.apply_chat_template(full, tokenize=False) == chat.render(full)


@pytest.mark.parametrize("kind", ["bastion", "chatml"])
def test_gguf_holds_the_same_template(tmp_path, kind):
    gguf = pytest.importorskip("gguf")
    from bastion.interop.gguf import export_gguf

    out, _, ckpt_dir = _chat_export(tmp_path, kind)
    reader = gguf.GGUFReader(export_gguf(ckpt_dir, tmp_path / "m.gguf", dtype="f32"))
    template = reader.fields["tokenizer.chat_template"].contents()
    assert template == json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert template == (DEFAULT_CHAT_TEMPLATE if kind == "bastion" else CHATML)


def test_generation_stops_at_the_templates_end_of_turn(tmp_path):
    out, chat, _ = _chat_export(tmp_path, "chatml")
    im_end = chat.tokenizer.token_to_id("<|im_end|>")
    assert chat.stop_ids == [chat.tokenizer.eos_id, im_end]  # eos <|endoftext|>, turns end with <|im_end|>
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert hf.generation_config.eos_token_id == chat.stop_ids


# ---- where the ids differ (docs/finetuning.md, "What differs") -------------------------------

@pytest.mark.parametrize("kind, content", [
    ("bastion", "  indented"),  # GPT-2 split: "\n" + two or more leading whitespace characters join
    ("chatml", "\n\nlisted"),  # Qwen2 split: "\n" + leading newlines join
])
def test_leading_whitespace_joined_across_the_template_edge(tmp_path, kind, content):
    """ChatFormat tokenizes message text apart from the template text before it; transformers
    tokenizes the rendered string whole, so its pre-tokenizer may join the template's "\\n"
    with the message's leading whitespace. Nothing else differs."""
    out, chat, _ = _chat_export(tmp_path, kind)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    messages = [{"role": "user", "content": content}]
    text = chat.render(messages, add_generation_prompt=True)
    edge = text.index(content)
    ours, theirs = chat.encode_prompt(messages), _hf_ids(hf_tok, messages, add_generation_prompt=True)
    assert theirs == hf_tok(text, add_special_tokens=False).input_ids
    assert ours == hf_tok(text[:edge], add_special_tokens=False).input_ids + hf_tok(text[edge:], add_special_tokens=False).input_ids
    assert ours != theirs and hf_tok.decode(ours) == hf_tok.decode(theirs) == text


def test_special_token_text_in_a_message(tmp_path):
    """transformers reads special-token text inside a message as the special token (a forged
    end of turn); Bastion never does. apply_chat_template(sanitize_control_tokens=True)
    keeps it text, and then gives Bastion's ids."""
    out, chat, _ = _chat_export(tmp_path, "bastion")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    messages = [{"role": "user", "content": "x<|endoftext|>y"}]
    eos = chat.tokenizer.eos_id
    assert chat.encode_prompt(messages).count(eos) == 1  # the template's end of turn only
    assert _hf_ids(hf_tok, messages, add_generation_prompt=True).count(eos) == 2
    assert _hf_ids(hf_tok, messages, add_generation_prompt=True, sanitize_control_tokens=True) == chat.encode_prompt(messages)
