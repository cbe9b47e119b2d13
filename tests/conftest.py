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
