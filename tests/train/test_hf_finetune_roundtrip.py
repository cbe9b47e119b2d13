"""The whole path a user takes: a Hugging Face Qwen2 chat model folder (built here, random
weights, ChatML specials) -> `import hf` -> LoRA SFT with its own chat template -> merge ->
`export hf` -> transformers loads it offline with equal logits and the same chat rendering."""
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from helpers import finetune_config  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from synthetic.chat import reverse_chat_records, write_jsonl  # noqa: E402
from bastion.interop import export_hf, import_hf  # noqa: E402
from bastion.interop.hf import QWEN2_SPLIT_REGEX  # noqa: E402
from bastion.infer.loading import load_for_inference  # noqa: E402
from bastion.adapters import merge_checkpoint  # noqa: E402
from bastion.train.loop import train  # noqa: E402

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qwen_folder(folder):
    folder.mkdir()
    tok = Tokenizer(models.BPE())  # Qwen2's tokenizer pipeline, so the export stays Qwen2 (see hf_model_type)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = [json.dumps(r) for r in reverse_chat_records(200, seed=9)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": CHATML}))
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=tok.get_vocab_size(), max_position_embeddings=128,
                                   tie_word_embeddings=True)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_hf_chat_model_in_finetuned_and_out(tmp_path):
    base = import_hf(qwen_folder(tmp_path / "qwen"), tmp_path / "base")
    loaded = load_for_inference(base)
    im_start, im_end = (loaded.tokenizer.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>"))
    assert loaded.tokenizer.eos_id == im_end and im_end in loaded.chat.stop_ids
    ids, mask = loaded.chat.encode_conversation([{"role": "user", "content": "hi <|im_end|>"},
                                                 {"role": "assistant", "content": "yo"}])
    assert ids.count(im_start) == 2 and ids.count(im_end) == 2  # the user's "<|im_end|>" stayed text
    assert mask[-2:] == [True, False] and ids[-2] == im_end  # the reply and its end marker train, "\n" not

    write_jsonl(tmp_path / "train.jsonl", reverse_chat_records(300, seed=1))
    run = train(finetune_config(base, tmp_path / "train.jsonl", tmp_path / "run", max_steps=20,
                                lora={"rank": 4, "alpha": 8, "target_modules": ["wq", "wv", "w1"]}), quiet=True)
    merged = merge_checkpoint(base, run.adapter, tmp_path / "merged")
    out = export_hf(merged, tmp_path / "hf_out")

    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "Qwen2ForCausalLM"
    ours = load_for_inference(merged).model
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (theirs(x).logits - ours(x)[0]).abs().max().item() <= 1e-4
        assert (ours(x)[0] - loaded.model(x)[0]).abs().max().item() > 1e-4  # fine-tuning changed the model
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "reverse: a b c"}]
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert hf_tok(rendered, add_special_tokens=False)["input_ids"] == load_for_inference(merged).chat.encode_prompt(messages)
    assert hf_tok.eos_token == "<|im_end|>" and hf_tok.pad_token == "<|endoftext|>"


def test_hf_model_in_classifier_out(tmp_path):
    """A Hugging Face Qwen2 model -> `import hf` -> train.objective classify -> `export hf`:
    Qwen2ForSequenceClassification with the class names, whose tokenizer(texts, padding=True)
    gives Bastion's ids and whose logits equal Bastion's scores."""
    from synthetic.labelled import classify_records

    from bastion.data.labelled import label_spec, load_labelled
    from bastion.model.heads import sequence_scores

    base = import_hf(qwen_folder(tmp_path / "qwen"), tmp_path / "base")
    write_jsonl(tmp_path / "train.jsonl", classify_records(120, seed=1))
    cfg = finetune_config(base, tmp_path / "train.jsonl", tmp_path / "run", objective="classify",
                          sequence={"labels": ["neg", "neu", "pos"]}, seq_len=64, max_steps=15, batch_size=8)
    result = train(cfg, quiet=True)
    out = export_hf(result.checkpoint, tmp_path / "hf")
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "Qwen2ForSequenceClassification" and hf.config.id2label[2] == "pos"

    loaded = load_for_inference(result.checkpoint, head="score")
    ft = loaded.config.finetune
    data = load_labelled(tmp_path / "train.jsonl", loaded.tokenizer, label_spec("classify", ft.sequence), ft, ["/"])
    batch = data.collate([[i] for i in range(8)], 64)
    texts = [r["text"] for r in classify_records(8, seed=1)]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf_tok.padding_side = "right"
    encoded = hf_tok(texts, padding=True, return_tensors="pt")
    assert torch.equal(encoded["input_ids"], batch["input_ids"])
    with torch.no_grad():
        theirs = hf(**encoded).logits
        mine = sequence_scores(loaded.model, batch["input_ids"], data.pad_id)
    assert (theirs - mine).abs().max().item() <= 1e-5 and mine.abs().max().item() > 0
