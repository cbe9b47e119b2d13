"""Shared fixtures: small prepared datasets and a tiny-model config for training tests."""
import os

import pytest

# Nothing may be downloaded: transformers / peft / TRL are used on folders the tests write.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from bastion.config import build_config
from bastion.data import prepare_dataset
from synthetic.corpus import arithmetic_documents, write_corpus


@pytest.fixture(scope="session")
def arithmetic_data(tmp_path_factory):
    """A prepared arithmetic dataset (~100k tokens) shared by the training tests."""
    root = tmp_path_factory.mktemp("arith")
    write_corpus(root / "src", arithmetic_documents(1500, seed=0, max_operand=20), name="arith")
    cfg = build_config({"data": {"sources": [str(root / "src")], "output_dir": str(root / "data"),
                                 "allowed_roots": [str(root)], "val_fraction": 0.1, "tokenizer": {"vocab_size": 300}}})
    prepare_dataset(cfg.data)
    return root / "data"


@pytest.fixture(scope="session")
def grammar_data(tmp_path_factory):
    """A prepared corpus of the synthetic agreement grammar ("the cats chase the dog.")."""
    from synthetic.corpus import grammar_documents

    root = tmp_path_factory.mktemp("grammar")
    write_corpus(root / "src", grammar_documents(1500, seed=0), name="grammar")
    cfg = build_config({"data": {"sources": [str(root / "src")], "output_dir": str(root / "data"),
                                 "allowed_roots": [str(root)], "val_fraction": 0.1, "tokenizer": {"vocab_size": 300}}})
    prepare_dataset(cfg.data)
    return root / "data"


@pytest.fixture(scope="session")
def grammar_checkpoint(tmp_path_factory):
    """The tiny agreement-grammar model of synthetic/grammar_model.py, trained once for the
    session: quantization, bf16 and perplexity tests measure the same (read-only) checkpoint."""
    from synthetic.grammar_model import train_grammar_checkpoint

    return train_grammar_checkpoint(tmp_path_factory.mktemp("grammar-model") / "run")


@pytest.fixture(scope="session")
def reward_run(tmp_path_factory):
    """A reward model (train.objective reward, 40 steps) on greeting pairs whose chosen reply is
    the polite one, trained once for the session: the objective's tests (tests/train) and the
    `reward_model` reward's (tests/rewards) read the same run. Its folder holds base/, run/ and
    pref.jsonl (training), val.jsonl (chat pairs) and held.jsonl (plain-prompt pairs)."""
    from helpers import finetune_config, make_base_checkpoint
    from synthetic.chat import greeting_preference_records, write_jsonl

    from bastion.train.loop import train

    root = tmp_path_factory.mktemp("reward-run")
    base = make_base_checkpoint(root / "base")
    write_jsonl(root / "pref.jsonl", greeting_preference_records(400, seed=1))
    write_jsonl(root / "val.jsonl", greeting_preference_records(64, seed=9))
    write_jsonl(root / "held.jsonl", greeting_preference_records(24, seed=9, chat=False))
    cfg = finetune_config(base, root / "pref.jsonl", root / "run", objective="reward", val_file=root / "val.jsonl",
                          max_steps=40, batch_size=8, lr=3e-3, eval_every=40, eval_batches=8)
    result = train(cfg, quiet=True)
    return {"root": root, "base": base, "result": result, "ckpt": result.checkpoint}
