"""Prompt JSONL for GRPO: string and chat prompts, the record handed to rewards, file:line errors."""
import pytest

from bastion.config import build_config
from bastion.data.prompts import load_prompts
from bastion.errors import DataError
from helpers import make_base_checkpoint
from synthetic.chat import write_jsonl


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    from bastion.checkpoint import load_checkpoint
    from bastion.checkpoint.contents import checkpoint_chat, checkpoint_tokenizer  # what a run starts from

    ckpt = load_checkpoint(make_base_checkpoint(tmp_path_factory.mktemp("base")), load_optimizer=False)
    return checkpoint_chat(ckpt, checkpoint_tokenizer(ckpt))


def settings(**kw):
    return build_config({"finetune": {"max_length": 64, **kw}}).finetune


def test_string_and_chat_prompts_keep_their_records(chat, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "reverse: abc", "answer": "cba", "tests": ["assert 1"]},
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "greet ana"}]},
    ])
    data = load_prompts(path, chat, settings(max_length=1024), ["/"])
    assert len(data) == 2 and data.report.dropped_too_long == 0
    first = data[0]
    assert first.record == {"prompt": "reverse: abc", "answer": "cba", "tests": ["assert 1"]}
    assert first.ids == chat.encode_prompt([{"role": "user", "content": "reverse: abc"}])
    assert first.text == chat.render([{"role": "user", "content": "reverse: abc"}], add_generation_prompt=True)
    assert chat.tokenizer.eos_id in first.stop_ids
    assert data[1].record["prompt"][1]["content"] == "greet ana"


def test_bad_lines_are_named_and_long_prompts_dropped(chat, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"answer": "1"}, {"prompt": ""}, {"prompt": 3},
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"prompt": "fine"},
    ])
    with pytest.raises(DataError) as err:
        load_prompts(path, chat, settings(), ["/"])
    text = str(err.value)
    assert "4 invalid record(s)" in text
    for line, what in ((1, "missing field 'prompt'"), (2, "'prompt' is empty"), (3, "'prompt' must be a string or a list"),
                       (4, "'prompt'")):
        assert f"bad.jsonl:{line}: {what}" in text
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 200}, {"prompt": "short"}])
    data = load_prompts(long, chat, settings(), ["/"])
    assert len(data) == 1 and data.report.dropped_too_long == 1


def test_files_outside_the_allowed_roots_are_refused(chat, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    with pytest.raises(DataError, match="outside|allowed"):
        load_prompts(path, chat, settings(), [str(tmp_path / "elsewhere")])
