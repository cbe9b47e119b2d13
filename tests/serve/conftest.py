"""Fixtures for the server tests: one tiny checkpoint for the session."""
import pytest
import torch
from helpers import make_base_checkpoint


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return make_base_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", seed=1)


@pytest.fixture(scope="session")
def long_prompt(serve_checkpoint):
    """A prompt the tiny model continues greedily for 100 tokens without an end of text:
    requests that are guaranteed to stay in flight (slot, queue and disconnect tests)."""
    from bastion.config.schema import GenerateConfig
    from bastion.infer.generate import generate
    from bastion.infer.loading import load_for_inference

    loaded = load_for_inference(serve_checkpoint)
    limits = GenerateConfig(max_new_tokens=100, max_new_tokens_ceiling=100, temperature=0.0)
    for word in ("a", "b", "the", "reverse: a", "hello", "greet", "x y z", "1 2 3", "kalomi", "go"):
        if generate(loaded.model, loaded.tokenizer, word, limits=limits).finish_reason == "length":
            return word
    pytest.skip("no prompt keeps the tiny model going for 100 tokens")
