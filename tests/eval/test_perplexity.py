"""`bastion eval perplexity`: full precision and quantized formats on the same held-out
tokens, from a text file or token shards; bad input refused with the field named."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bastion.cli import app
from bastion.data.shards import FORMAT_NAME, FORMAT_VERSION, ShardWriter, token_dtype
from bastion.errors import ConfigError, DataError
from bastion.eval.perplexity import FORMATS, eval_perplexity, windows
from bastion.infer.loading import load_for_inference
from bastion.infer.quantize import quantize_checkpoint
from synthetic.corpus import grammar_documents

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(grammar_checkpoint):
    return grammar_checkpoint  # shared by the session (tests/conftest.py)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Held-out sentences of the grammar (another seed than training) as a text file."""
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text("\n".join(grammar_documents(120, seed=99)) + "\n")
    return path


@pytest.fixture(scope="module")
def every_format(trained, held_out):
    return eval_perplexity(trained, text=held_out, formats=FORMATS, roots=[str(held_out.parent)], seq_len=64,
                           max_tokens=4096)


def test_windows_predict_every_token_but_the_first_exactly_once():
    tokens = torch.arange(23)
    chunks = windows(tokens, 5)
    assert [c.tolist()[0] for c in chunks] == [0, 5, 10, 15, 20]
    assert [len(c) for c in chunks] == [6, 6, 6, 6, 3]
    targets = [t for c in chunks for t in c[1:].tolist()]
    assert targets == list(range(1, 23))


def test_full_precision_perplexity_is_the_models_own_loss_on_the_windows(trained, held_out, every_format):
    loaded = load_for_inference(trained)
    ids = torch.tensor(loaded.tokenizer.encode(held_out.read_text())[:4096])
    total = 0.0
    with torch.no_grad():
        for chunk in windows(ids, 64):
            _, loss = loaded.model(chunk[None, :-1], chunk[None, 1:])
            total += loss.item() * (len(chunk) - 1)
    row = every_format["formats"]["fp32"]
    assert every_format["tokens"] == row["tokens"] == len(ids) - 1
    assert row["nll"] == pytest.approx(total / (len(ids) - 1), rel=1e-5)
    assert row["perplexity"] == pytest.approx(math.exp(row["nll"]))
    assert row["change_pct"] == 0.0 and every_format["baseline"] == "fp32" and every_format["seq_len"] == 64


def test_each_format_gives_up_what_its_bits_imply(every_format):
    """Measured on this model (fp32 perplexity 4.352 on 4,095 tokens): gguf-f16 +0.005%,
    bf16 +0.02%, int8 -0.05%, gguf-q8_0 -0.02% (8 bits: noise either way), int4 +0.53%,
    gguf-q4_0 +0.75% (4 bits: a real loss). Bounds leave several times that room."""
    change = {name: row["change_pct"] for name, row in every_format["formats"].items()}
    assert set(change) == set(FORMATS)
    assert abs(change["gguf-f16"]) < 0.05
    for name in ("bf16", "int8", "gguf-q8_0"):
        assert abs(change[name]) < 0.5, change
    for name in ("int4", "gguf-q4_0"):
        assert 0 < change[name] < 8, change
        assert change[name] > abs(change["int8"]), change


def test_token_shards_give_the_same_perplexity_as_the_text(trained, held_out, every_format, tmp_path):
    loaded = load_for_inference(trained)
    ids = np.array(loaded.tokenizer.encode(held_out.read_text()))
    vocab = loaded.config.model.vocab_size
    data = tmp_path / "data"
    data.mkdir()
    writer = ShardWriter(data, "val", token_dtype(vocab), shard_tokens=1000)  # several shards: reads stitch them
    writer.write(ids)
    tokenizer_json = loaded.tokenizer.to_json_str()
    index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "vocab_size": vocab, "eos_id": loaded.tokenizer.eos_id,
             "dtype": token_dtype(vocab), "splits": {"val": writer.close(documents=120)},
             "tokenizer": "tokenizer.json", "tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest()}
    (data / "tokenizer.json").write_text(tokenizer_json)
    (data / "index.json").write_text(json.dumps(index))
    got = eval_perplexity(trained, data=data, formats=["fp32", "int8"], roots=[str(tmp_path)], seq_len=64,
                          max_tokens=4096)
    for name in ("fp32", "int8"):
        assert got["formats"][name]["nll"] == pytest.approx(every_format["formats"][name]["nll"], rel=1e-6)

    other = json.loads(tokenizer_json)
    first = next(iter(other["model"]["vocab"]))
    other["model"]["vocab"][first + "x"] = other["model"]["vocab"].pop(first)  # same size, another token
    (data / "tokenizer.json").write_text(json.dumps(other))
    index["tokenizer_sha256"] = hashlib.sha256((data / "tokenizer.json").read_bytes()).hexdigest()
    (data / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="another tokenizer than the checkpoint's"):
        eval_perplexity(trained, data=data, formats=["fp32"], roots=[str(tmp_path)])
    index["vocab_size"] = vocab + 1
    (data / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=f"vocabulary has {vocab + 1} tokens, the model's {vocab}"):
        eval_perplexity(trained, data=data, formats=["fp32"], roots=[str(tmp_path)])


def test_a_quantized_checkpoint_is_measured_in_its_own_format_only(trained, held_out, every_format, tmp_path):
    saved = quantize_checkpoint(trained, tmp_path / "int8", "int8")
    got = eval_perplexity(saved, text=held_out, formats=["int8"], roots=[str(held_out.parent)], seq_len=64,
                          max_tokens=4096)
    assert got["formats"]["int8"]["nll"] == pytest.approx(every_format["formats"]["int8"]["nll"], rel=1e-6)
    with pytest.raises(ConfigError, match="int8-quantized checkpoint: it can only be measured as --formats int8"):
        eval_perplexity(saved, text=held_out, formats=["fp32", "int8"], roots=[str(held_out.parent)])


def test_bad_requests_are_refused_naming_what_is_wrong(trained, held_out, tmp_path):
    roots = [str(held_out.parent)]
    with pytest.raises(ConfigError, match=r"--formats: unknown format 'q5_k'; choose from fp32, bf16"):
        eval_perplexity(trained, text=held_out, formats=["fp32", "q5_k"], roots=roots)
    with pytest.raises(ConfigError, match="named twice"):
        eval_perplexity(trained, text=held_out, formats=["int8", "int8"], roots=roots)
    with pytest.raises(ConfigError, match="exactly one of --text"):
        eval_perplexity(trained, roots=roots)
    with pytest.raises(ConfigError, match="exactly one of --text"):
        eval_perplexity(trained, text=held_out, data=held_out.parent, roots=roots)
    with pytest.raises(DataError, match="outside the allowed roots"):
        eval_perplexity(trained, text=held_out, roots=[str(tmp_path)])
    one_word = tmp_path / "one.txt"
    one_word.write_text("a")
    with pytest.raises(DataError, match="perplexity needs at least 2"):
        eval_perplexity(trained, text=one_word, roots=[str(tmp_path)])
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"the cat \xff")
    with pytest.raises(DataError, match="not valid UTF-8"):
        eval_perplexity(trained, text=bad_utf8, roots=[str(tmp_path)])


def test_cli_prints_the_table_and_writes_json(trained, held_out, tmp_path, monkeypatch):
    monkeypatch.chdir(held_out.parent)
    out = tmp_path / "ppl.json"
    result = runner.invoke(app, ["eval", "perplexity", "--checkpoint", str(trained), "--text", held_out.name,
                                 "--formats", "fp32,int4,gguf-q4_0", "--seq-len", "64", "--max-tokens", "2048",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "change vs fp32" in result.output and "gguf-q4_0" in result.output
    data = json.loads(out.read_text())
    assert list(data["formats"]) == ["fp32", "int4", "gguf-q4_0"] and data["tokens"] == 2047
    bad = runner.invoke(app, ["eval", "perplexity", "--checkpoint", str(trained), "--text", held_out.name,
                              "--formats", "fp16"])
    assert bad.exit_code == 2 and "unknown format 'fp16'" in bad.output
