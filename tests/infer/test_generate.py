import dataclasses

import pytest
import torch

from bastion.config.schema import GenerateConfig
from bastion.errors import GenerationLimitError
from bastion.infer import GenerationResult, SamplingParams, check_request, generate, sampling_params, stream
from bastion.infer.generate import _emittable
from bastion.config.presets import model_config
from bastion.model import Transformer
from bastion.tokenizer import BastionTokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Bastion trains small language models from raw text, safely.",
    "Über café naïve façade — 東京 北京 上海 😀 🚀 emoji and CJK make multi-byte tokens.",
    "def main():\n    return 42\n",
]
LIMITS = GenerateConfig(max_new_tokens=20, max_new_tokens_ceiling=100, temperature=0.0, top_k=None)


@pytest.fixture(scope="module")
def tok() -> BastionTokenizer:
    return BastionTokenizer.train(CORPUS * 4, vocab_size=400, min_frequency=2)


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    torch.manual_seed(0)
    # Large init so a random model's distribution is far from uniform (varied text, real argmaxes).
    return Transformer(model_config("tiny", vocab_size=tok.vocab_size, init_std=0.2)).eval()


class LogitHook:
    """Edits the eos logit of a real model: ban it, or force it from the `force_at`-th forward."""

    def __init__(self, model, eos_id, force_at=None):
        self.eos_id, self.force_at, self.calls = eos_id, force_at, 0
        self.handle = model.output.register_forward_hook(self)

    def __call__(self, module, inputs, out):
        self.calls += 1
        out = out.clone()
        force = self.force_at is not None and self.calls >= self.force_at
        out[..., self.eos_id] = out.max() + 1 if force else float("-inf")
        return out

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run(model, tok, prompt="The quick", **kw) -> GenerationResult:
    with LogitHook(model, tok.eos_id):
        return generate(model, tok, prompt, limits=LIMITS, **kw)


def test_greedy_is_deterministic_and_stops_at_length(model, tok):
    a, b = run(model, tok), run(model, tok)
    assert a == b
    assert a.finish_reason == "length" and len(a.token_ids) == LIMITS.max_new_tokens
    assert a.prompt_tokens == len(tok.encode("The quick"))
    assert a.text == tok.decode(a.token_ids) and len(a.text) > 0
    assert len(set(a.token_ids)) > 1  # not a degenerate repeat


def test_greedy_matches_manual_full_recompute(model, tok):
    # The KV-cached loop picks the same tokens as argmax over a full forward each step.
    res = run(model, tok, max_new_tokens=8)
    ids = tok.encode("The quick")
    with torch.no_grad():
        for _ in range(8):
            logits, _ = model(torch.tensor([ids]))
            logits[..., tok.eos_id] = float("-inf")
            ids.append(int(logits[0, -1].argmax()))
    assert res.token_ids == ids[-8:]


def test_seeded_sampling_is_reproducible(model, tok):
    kw = dict(temperature=1.0, top_k=None, top_p=1.0, max_new_tokens=30)
    a, b, c = run(model, tok, seed=7, **kw), run(model, tok, seed=7, **kw), run(model, tok, seed=8, **kw)
    assert a == b
    assert a.token_ids != c.token_ids


def test_top_k_one_equals_greedy(model, tok):
    assert run(model, tok, temperature=1.3, top_k=1, seed=3).token_ids == run(model, tok).token_ids


def test_defaults_come_from_limits(model, tok):
    limits = GenerateConfig(max_new_tokens=5, temperature=0.0)
    with LogitHook(model, tok.eos_id):
        assert len(generate(model, tok, "Hi", limits=limits).token_ids) == 5


def test_stop_string_truncates(model, tok):
    full = run(model, tok, max_new_tokens=40)
    s = full.text[6:9]
    expected = full.text[:full.text.find(s)]
    res = run(model, tok, max_new_tokens=40, stop=["never-appears", s])
    assert res.finish_reason == "stop" and res.text == expected
    assert s not in res.text and len(res.token_ids) < 40
    assert tok.decode(res.token_ids).startswith(expected + s)


def test_eos_stops(model, tok):
    with LogitHook(model, tok.eos_id, force_at=4):  # prefill + 2 decode steps are normal
        res = generate(model, tok, "The quick", limits=LIMITS)
    assert res.finish_reason == "eos" and len(res.token_ids) == 3
    assert tok.eos_id not in res.token_ids and res.text == tok.decode(res.token_ids)


def test_eos_first_gives_empty_text(model, tok):
    with LogitHook(model, tok.eos_id, force_at=1):
        res = generate(model, tok, "The quick", limits=LIMITS)
    assert res == GenerationResult(text="", token_ids=[], prompt_tokens=res.prompt_tokens, finish_reason="eos",
                                   end_id=tok.eos_id)


@pytest.mark.parametrize("kw", [
    dict(), dict(stop=["e", "o"]), dict(temperature=1.0, seed=11, max_new_tokens=60),
    dict(temperature=1.0, seed=12, max_new_tokens=60, stop=["the", "東京"]),
])
def test_stream_concatenates_to_generate(model, tok, kw):
    with LogitHook(model, tok.eos_id):
        items = list(stream(model, tok, "Über 東", limits=LIMITS, **kw))
        result = generate(model, tok, "Über 東", limits=LIMITS, **kw)
    *deltas, last = items
    assert last == result
    assert all(isinstance(d, str) and d for d in deltas)
    assert "".join(deltas) == result.text


def test_stream_holds_back_partial_characters(model, tok):
    # Sample random tokens (incl. lone bytes of multi-byte characters); no delta but the
    # last may end in U+FFFD, since an incomplete character may still be completed.
    for seed in range(5):
        with LogitHook(model, tok.eos_id):
            *deltas, result = stream(model, tok, "😀", limits=LIMITS, temperature=2.0, seed=seed, max_new_tokens=40)
        assert "".join(deltas) == result.text == tok.decode(result.token_ids)  # incremental == full decode
        assert not any(d.endswith("\ufffd") for d in deltas[:-1])


def test_emittable():
    assert _emittable("hello", []) == 5
    assert _emittable("hello wo", ["world"]) == 6  # "wo" may become "world"
    assert _emittable("hello w", ["xyz", "world"]) == 6
    assert _emittable("hello wor", ["w", "world"]) == 6
    assert _emittable("hello", ["hello!"]) == 0


def test_stream_leaves_caller_state_alone(model, tok):
    model.train()
    try:
        gen = stream(model, tok, "The", limits=LIMITS, max_new_tokens=30)
        next(gen)
        assert not torch.is_inference_mode_enabled()  # not leaked into the caller between items
        assert not model.training
        list(gen)
        assert model.training  # restored
    finally:
        model.eval()


# ---- limits -------------------------------------------------------------------------

def test_check_request_returns_effective_max_new_tokens():
    limits = GenerateConfig(max_new_tokens=10, max_new_tokens_ceiling=50)
    assert check_request(5, None, None, limits, context_size=128) == 10
    assert check_request(5, 50, ["a"], limits, context_size=128) == 50
    assert check_request(78, 50, None, limits, context_size=128) == 50  # exactly fills the context


@pytest.mark.parametrize("args, limits, match", [
    ((5, 101, None), {}, r"max_new_tokens \(101\) exceeds .*max_new_tokens_ceiling \(100\)"),
    ((5, 0, None), {}, r"max_new_tokens must be >= 1, got 0"),
    ((5, -3, None), {}, r"max_new_tokens must be >= 1"),
    ((5, 2.5, None), {}, r"max_new_tokens must be an integer"),
    ((0, 10, None), {}, r"prompt is empty"),
    ((65, 10, None), {"max_prompt_tokens": 64}, r"prompt has 65 tokens.*max_prompt_tokens \(64\)"),
    ((129, 1, None), {}, r"prompt has 129 tokens.*context size \(128\)"),
    ((100, 29, None), {}, r"prompt tokens \(100\) \+ max_new_tokens \(29\) = 129 exceeds .*context size \(128\)"),
    ((5, 10, ["a"] * 9), {}, r"stop has 9 strings.*max_stop_strings \(8\)"),
    ((5, 10, ["x" * 257]), {}, r"stop\[0\] is 257 characters.*256"),
    ((5, 10, ["ok", ""]), {}, r"stop\[1\] must be a non-empty string"),
    ((5, 10, "stop"), {}, r"stop must be a list"),
])
def test_every_limit_raises(args, limits, match):
    cfg = GenerateConfig(max_new_tokens=10, max_new_tokens_ceiling=100, **limits)
    with pytest.raises(GenerationLimitError, match=match):
        check_request(*args, limits=cfg, context_size=128)


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=101), "max_new_tokens_ceiling"),  # an error, never a silent cut
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.1), "top_p"),
    (dict(seed=-1), "seed"),
])
def test_generate_enforces_limits(model, tok, kw, match):
    with pytest.raises(GenerationLimitError, match=match):
        generate(model, tok, "The quick", limits=LIMITS, **kw)


def test_sampling_params_fills_defaults_from_limits():
    limits = GenerateConfig(max_new_tokens=7, max_new_tokens_ceiling=50, temperature=0.5, top_k=3, top_p=0.9)
    assert sampling_params(limits, 128, 4, vocab_size=300) == SamplingParams(
        max_new_tokens=7, temperature=0.5, top_k=3, top_p=0.9, seed=None, stop=(), stop_ids=())
    p = sampling_params(limits, 128, 4, vocab_size=300, max_new_tokens=50, temperature=0, top_k=None, top_p=1,
                        seed=2**63 - 1, stop=["a", "b"], stop_ids=[7, 3, 7])
    assert p == SamplingParams(max_new_tokens=50, temperature=0, top_k=3, top_p=1, seed=2**63 - 1, stop=("a", "b"),
                               stop_ids=(7, 3))  # top_k None: the default; stop ids without duplicates
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=101), r"max_new_tokens \(101\) exceeds"),
    (dict(max_new_tokens=True), "max_new_tokens must be an integer"),
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=100.5), "temperature"), (dict(temperature=True), "temperature"),
    (dict(temperature="1"), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.0), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.1), "top_p"), (dict(top_p=False), "top_p"),
    (dict(seed=-1), "seed"), (dict(seed=2**63), "seed"), (dict(seed=1.0), "seed"), (dict(seed=True), "seed"),
    (dict(stop="x"), "stop must be a list"), (dict(stop=[""]), r"stop\[0\]"), (dict(stop=["a"] * 9), "max_stop_strings"),
    (dict(stop_ids=5), "stop_ids"), (dict(stop_ids=[300]), "stop_ids"), (dict(stop_ids=[-1]), "stop_ids"),
    (dict(stop_ids=[True]), "stop_ids"),
])
def test_sampling_params_refuses_each_bad_setting(kw, match):
    limits = GenerateConfig(max_new_tokens=10, max_new_tokens_ceiling=100)
    with pytest.raises(GenerationLimitError, match=match):
        sampling_params(limits, 128, 5, vocab_size=300, **kw)


def test_generate_checks_stop_ids(model, tok):
    with pytest.raises(GenerationLimitError, match="stop_ids"):
        generate(model, tok, "The quick", limits=LIMITS, stop_ids=[tok.vocab_size])


def test_generate_rejects_empty_and_oversized_prompts(model, tok):
    with pytest.raises(GenerationLimitError, match="prompt is empty"):
        generate(model, tok, "", limits=LIMITS)
    with pytest.raises(GenerationLimitError, match="prompt has"):
        generate(model, tok, "fox " * 200, limits=LIMITS)
    prompt = "zq xv " * 8
    assert 28 < len(tok.encode(prompt)) < 128
    with pytest.raises(GenerationLimitError, match=r"\+ max_new_tokens \(100\) = .* exceeds the model's context size \(128\)"):
        generate(model, tok, prompt, limits=LIMITS, max_new_tokens=100)
    limits = GenerateConfig(max_prompt_tokens=3, temperature=0.0)
    with pytest.raises(GenerationLimitError, match="max_prompt_tokens"):
        generate(model, tok, "The quick brown fox", limits=limits)


def test_stop_strings_on_random_multibyte_text(model, tok):
    # Sampled text is full of multi-byte characters split across tokens; any substring used
    # as a stop string must cut the text at its first occurrence, streamed or not.
    kw = dict(temperature=2.0, max_new_tokens=40)
    checked = 0
    for seed in range(4):
        full = run(model, tok, "東京", seed=seed, **kw).text
        for start, length in [(2, 1), (5, 2), (9, 3), (14, 4)]:
            s = full[start:start + length]
            if len(s) < length or "\ufffd" in s:
                continue
            expected = full[:full.find(s)]
            with LogitHook(model, tok.eos_id):
                *deltas, res = stream(model, tok, "東京", limits=LIMITS, seed=seed, stop=[s], **kw)
            assert res.finish_reason == "stop" and res.text == expected == "".join(deltas)
            checked += 1
    assert checked >= 8


def test_stream_validates_at_call_time(model, tok):
    with pytest.raises(GenerationLimitError, match="max_new_tokens_ceiling"):
        stream(model, tok, "The", limits=LIMITS, max_new_tokens=101)  # no iteration needed
