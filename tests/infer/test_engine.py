import asyncio
import threading
import time

import pytest
import torch

from bastion.config.schema import GenerateConfig, ModelConfig
from bastion.errors import EngineClosedError, GenerationLimitError, QueueFullError
from bastion.infer import GenerationResult, generate, stream
from bastion.infer.engine import Engine as _Engine
from bastion.infer.engine import SamplingParams
from bastion.model import Transformer
from bastion.tokenizer import BastionTokenizer



def Engine(*args, mode="rowwise", **kw):  # noqa: N802 - stands in for the class
    """Most tests compare with generate() bit for bit, which the "rowwise" mode guarantees;
    the default "padded" mode is tested against itself (alone vs batched) below."""
    return _Engine(*args, mode=mode, **kw)


TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Bastion trains small language models from raw text, safely.",
    "Über café naïve façade — 東京 北京 上海 😀 🚀 emoji and CJK make multi-byte tokens.",
    "def main():\n    return 42\n",
]
LIMITS = GenerateConfig(max_new_tokens=20, max_new_tokens_ceiling=100, temperature=0.0, top_k=None)
PROMPTS = ["The quick", "def main():\n", "Über café naïve façade — 東京", "a", "The lazy dog jumps over the fox. The"]


def tiny_model(init_std: float = 0.2, **cfg) -> Transformer:
    torch.manual_seed(0)
    settings = dict(vocab_size=300, d_model=64, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=128, init_std=init_std)
    return Transformer(ModelConfig(**{**settings, **cfg})).eval()


@pytest.fixture(scope="module")
def tok() -> BastionTokenizer:
    return BastionTokenizer.train(TEXTS * 4, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def model() -> Transformer:
    # A large init: a random model's logits are far from uniform (varied text, clear argmaxes).
    return tiny_model()


class OutputHook:
    """Edits (or watches) the model's logits, in whatever thread runs the model."""

    def __init__(self, model, fn):
        self.fn = fn
        self.handle = model.output.register_forward_hook(lambda module, inputs, out: fn(out))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def ban_eos(model, tok):
    def fn(out):
        out = out.clone()
        out[..., tok.eos_id] = float("-inf")
        return out
    return OutputHook(model, fn)


def slow(model, seconds=0.005):
    return OutputHook(model, lambda out: time.sleep(seconds))


def ids(tok, text):
    return tok.encode(text)


def submit(engine, tok, prompt, loop=None, **kw):
    prompt_ids = ids(tok, prompt)
    return engine.submit(prompt_ids, engine.params(len(prompt_ids), **kw), loop=loop)


def collect(handle):
    *deltas, result = list(handle)
    assert isinstance(result, GenerationResult)
    assert all(isinstance(d, str) and d for d in deltas)
    assert "".join(deltas) == result.text
    return deltas, result


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def assert_idle(engine):
    """No per-request state left: no request's own cache held, every shared-cache row wiped."""
    assert engine.stats["running"] == engine.stats["waiting"] == 0
    assert not engine._running and not engine._waiting
    if engine._cache is None:  # padded, rowwise: each request had its own cache, freed at its end
        prefix = engine.prefix_cache
        assert engine.kv_cache_bytes == (0 if prefix is None else prefix.stats()["blocks"] * prefix_block_bytes(engine))
    else:
        assert all(not k.any() and not v.any() for k, v in zip(engine._cache.k, engine._cache.v))


def prefix_block_bytes(engine):
    k = engine.prefix_cache.k[0]
    return 2 * len(engine.prefix_cache.k) * k[0].numel() * k.element_size()


# ---- model: rows of a cache, batched decode step -------------------------------------------

@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_cache_row_view_is_bit_identical_to_own_cache(n_kv_head):
    # The engine's batch-invariant mode rests on this: a sequence in row r of a big cache
    # computes exactly what it computes in its own cache, as generate() uses.
    model = tiny_model(n_kv_head=n_kv_head)
    prompt = torch.randint(0, 300, (1, 11))
    big, own = model.new_cache(3), model.new_cache(1, max_len=20)
    with torch.inference_mode():
        a, _ = model(prompt, cache=big.rows(2, 3))
        b, _ = model(prompt, cache=own)
        assert torch.equal(a, b)
        for pos in range(11, 15):
            a, _ = model(torch.tensor([[pos]]), cache=big.rows(2, 3), start_pos=pos)
            b, _ = model(torch.tensor([[pos]]), cache=own, start_pos=pos)
            assert torch.equal(a, b)
    assert torch.equal(big.k[0][2, :, :15], own.k[0][0, :, :15])  # written through the view
    assert not big.k[0][:2].any()
    with pytest.raises(ValueError, match="outside"):
        big.rows(2, 4)


def prefilled_twice(model, lens):
    """Two 4-row caches holding the same random prompts of `lens` tokens, row by row."""
    batched, alone = model.new_cache(4), model.new_cache(4)
    with torch.inference_mode():
        for r, n in enumerate(lens):
            prompt = torch.randint(0, 300, (1, n))
            model(prompt, cache=batched.rows(r, r + 1))
            model(prompt, cache=alone.rows(r, r + 1))
    return batched, alone


@pytest.mark.parametrize("cfg", [dict(), dict(n_kv_head=4), dict(sliding_window=5)])
def test_decode_step_matches_rows_decoded_alone(cfg):
    model = tiny_model(**cfg)
    lens = [3, 9, 1, 14]
    batched, alone = prefilled_twice(model, lens)
    with torch.inference_mode():
        for rows in ([3, 0, 1], [0, 1, 2, 3]):  # scattered rows (a gather), then a contiguous run
            tokens, positions = [7 * r + 1 for r in rows], [lens[r] for r in rows]
            out = model.decode_step(tokens, batched, rows, positions)
            expected = torch.cat([model(torch.tensor([[t]]), cache=alone.rows(r, r + 1), start_pos=p)[0][:, -1]
                                  for t, r, p in zip(tokens, rows, positions)])
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
            for r in rows:
                lens[r] += 1
        torch.testing.assert_close(batched.k[1], alone.k[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [dict(), dict(n_kv_head=4), dict(sliding_window=5)])
def test_decode_rows_matches_rows_decoded_alone_and_ignores_its_companions(cfg):
    """decode_rows: the math of a lone decode step (up to BLAS's row-count effects), and a
    row's logits bit-identical whichever other rows share the step, for one row count."""
    model = tiny_model(**cfg)
    lens = [3, 9, 1, 14]
    batched, alone = prefilled_twice(model, lens)
    with torch.inference_mode():
        rows = [3, 0, 1]
        tokens, positions = [7 * r + 1 for r in rows], [lens[r] for r in rows]
        out = model.decode_rows(tokens, [batched.rows(r, r + 1) for r in rows], positions, pad_to=6)
        expected = torch.cat([model(torch.tensor([[t]]), cache=alone.rows(r, r + 1), start_pos=p)[0][:, -1]
                              for t, r, p in zip(tokens, rows, positions)])
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batched.k[1], alone.k[1], rtol=1e-5, atol=1e-5)
        # Row 3 again at the same position, with other companions and places: the same bits.
        with_others = model.decode_rows([tokens[1], 5, tokens[0]], [batched.rows(r, r + 1) for r in (0, 2, 3)],
                                        [positions[1], 1, positions[0]], pad_to=6)
        assert torch.equal(with_others[2], out[0]) and torch.equal(with_others[0], out[1])
        with pytest.raises(ValueError, match="pad_to"):
            model.decode_rows([1, 2], [batched.rows(0, 1), batched.rows(1, 2)], [0, 0], pad_to=1)
        with pytest.raises(ValueError, match="distinct"):
            model.decode_rows([1, 2], [batched.rows(0, 1), batched.rows(0, 1)], [0, 0], pad_to=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_tile_probe_finds_row_counts_with_bit_identical_rows(dtype):
    from bastion.infer.engine import invariant_tile_rows

    model = tiny_model().to(dtype)
    with torch.inference_mode():
        lo, hi = invariant_tile_rows(model, 16)
        assert 1 <= lo <= hi <= 16
        caches = [model.new_cache(1, max_len=4) for _ in range(hi)]
        tokens = list(range(11, 11 + hi))
        widest = model.decode_rows(tokens, caches, [0] * hi, pad_to=hi)
        for p in range(lo, hi + 1):  # the first rows of any tile size in range: the same bits
            assert torch.equal(model.decode_rows(tokens[:p], caches[:p], [0] * p, pad_to=p), widest[:p])
        one = model.decode_rows(tokens[-1:], caches[:1], [0], pad_to=lo)  # one row, padded to lo: as among hi
        assert torch.equal(one[0], widest[-1])


def test_padded_mode_tiles_split_a_full_batch_without_changing_any_row(tok, monkeypatch):
    """More running requests than the widest invariant tile: the step runs several tiles
    (and narrower ones padded up), and each request still gets exactly its lone tokens."""
    import bastion.infer.engine as engine_module

    monkeypatch.setattr(engine_module, "PROBE_ROWS", 4)  # force tiles of at most 4 rows for 7 requests
    model = tiny_model(0.02)
    requests = [(PROMPTS[i % 5], dict(max_new_tokens=6 + i, temperature=1.0 if i % 2 else 0.0, seed=i))
                for i in range(7)]
    with ban_eos(model, tok):
        alone = [run_engine(model, tok, [r], max_batch_size=8, staggered=False, mode="padded")[0] for r in requests]
        together = run_engine(model, tok, requests, max_batch_size=8, staggered=False, queued_first=True,
                              mode="padded")
        staggered = run_engine(model, tok, requests, max_batch_size=8, staggered=True, mode="padded")
    assert together == alone and staggered == alone


def test_tiles_are_near_equal_and_padded_into_the_probed_range(model, tok):
    engine = _Engine(model, tok, LIMITS, max_batch_size=16)
    engine._tile_rows = (3, 5)
    seqs = list(range(11))
    tiles = engine._tiles(seqs)
    assert [len(t) for t, _ in tiles] == [4, 4, 3] and [p for _, p in tiles] == [4, 4, 3]
    assert [x for t, _ in tiles for x in t] == seqs
    assert engine._tiles([0]) == [([0], 3)]


def test_decode_step_checks_its_arguments():
    model = tiny_model()
    cache = model.new_cache(2)
    with pytest.raises(ValueError, match="distinct"):
        model.decode_step([1, 2], cache, [0, 0], [0, 0])
    with pytest.raises(ValueError, match="distinct"):
        model.decode_step([1], cache, [2], [0])
    with pytest.raises(ValueError, match="positions"):
        model.decode_step([1], cache, [0], [128])
    with pytest.raises(ValueError, match="same non-zero length"):
        model.decode_step([1, 2], cache, [0], [0])


# ---- batch invariance -----------------------------------------------------------------------

def run_engine(model, tok, requests, *, max_batch_size, staggered, queued_first=False, **engine_kw):
    """requests: (prompt, kwargs) pairs. Staggered: a request joins only after the previous
    one has produced output, so requests join and leave the batch at different times.
    queued_first: every request is queued before the engine thread starts, so they all join
    at once (submitting to a running engine lets it take the first request alone)."""
    engine = Engine(model, tok, LIMITS, max_batch_size=max_batch_size, **engine_kw)
    handles = []
    if queued_first:
        assert not staggered
        handles, requests = [submit(engine, tok, prompt, **kw) for prompt, kw in requests], []
    with engine:
        for prompt, kw in requests:
            handles.append(submit(engine, tok, prompt, **kw))
            if staggered:
                next(iter(handles[-1]))
        results = [h.result(timeout=30) for h in handles]
        assert_idle(engine)
    return results


GREEDY = [(p, dict(max_new_tokens=n)) for p, n in zip(PROMPTS, [20, 7, 33, 12, 3])]


@pytest.mark.parametrize("init_std", [0.2, 0.02])  # 0.02: near-uniform logits, where near-ties are common
def test_greedy_is_batch_invariant_and_equals_generate(tok, init_std):
    model = tiny_model(init_std)
    with ban_eos(model, tok):
        expected = [generate(model, tok, p, limits=LIMITS, **kw) for p, kw in GREEDY]
        for max_batch_size in (1, 2, 4):
            for staggered in (False, True):
                got = run_engine(model, tok, GREEDY, max_batch_size=max_batch_size, staggered=staggered)
                assert got == expected, (max_batch_size, staggered)
    assert [r.finish_reason for r in expected] == ["length"] * 5
    assert [len(r.token_ids) for r in expected] == [20, 7, 33, 12, 3]


def test_batched_decode_mode_gives_the_same_greedy_tokens(model, tok):
    # mode="dynamic" batches the matmuls (last-bit differences): with this model's
    # well-separated logits no token changes.
    with ban_eos(model, tok):
        expected = [generate(model, tok, p, limits=LIMITS, **kw).token_ids for p, kw in GREEDY]
        got = run_engine(model, tok, GREEDY, max_batch_size=4, staggered=True, mode="dynamic")
    assert [r.token_ids for r in got] == expected


def prefill_shapes(model):
    """Watches the model's forward calls over more than one token: the prefills' [B, T]."""
    shapes = []
    handle = model.register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0].shape)) if args[0].size(1) > 1 else None)
    return shapes, handle


@pytest.mark.parametrize("budget", [None, 12])
def test_dynamic_mode_prefills_joining_prompts_together(model, tok, monkeypatch, budget):
    """Requests joining together with prompts of different lengths: right-padded forwards of
    several prompts (each prompt's keys/values only copied to its slot, the logits of its own
    last token), one forward when they fit PREFILL_TOKENS, split when not (a prompt longer than
    the budget alone); the same greedy tokens as generate() gives each alone."""
    import bastion.infer.engine as engine_module

    if budget is not None:
        monkeypatch.setattr(engine_module, "PREFILL_TOKENS", budget)
    with ban_eos(model, tok):
        expected = [generate(model, tok, p, limits=LIMITS, **kw).token_ids for p, kw in GREEDY]
        shapes, handle = prefill_shapes(model)
        try:
            got = run_engine(model, tok, GREEDY, max_batch_size=len(GREEDY), staggered=False, queued_first=True,
                             mode="dynamic")
        finally:
            handle.remove()
    lengths = sorted(len(tok.encode(p)) for p, _ in GREEDY)
    assert len(set(lengths)) > 2
    if budget is None:
        assert shapes == [(len(GREEDY), lengths[-1])]  # one forward, padded to the longest prompt
    else:
        assert len(shapes) > 1 and all(b * t <= max(budget, t) for b, t in shapes)
        assert sum(b for b, _ in shapes) == len(GREEDY)
    assert [r.token_ids for r in got] == expected


@pytest.mark.parametrize("init_std", [0.2, 0.02])
def test_padded_mode_is_batch_invariant(tok, init_std):
    """The default mode batches every step over all slots with fixed shapes: a request's
    tokens are the same alone (the only one running) and batched with others that join and
    leave at different times, greedy and seeded sampling alike."""
    model = tiny_model(init_std)
    requests = GREEDY + [("The quick", dict(temperature=1.0, top_k=None, seed=7, max_new_tokens=25)),
                         ("Über", dict(temperature=0.8, top_p=0.9, seed=8, max_new_tokens=18))]
    with ban_eos(model, tok):
        alone = [run_engine(model, tok, [r], max_batch_size=4, staggered=False, mode="padded")[0] for r in requests]
        for staggered in (False, True):
            together = run_engine(model, tok, requests, max_batch_size=4, staggered=staggered, mode="padded")
            assert together == alone, staggered
    assert [len(r.token_ids) for r in alone[:5]] == [20, 7, 33, 12, 3]


# ---- batch invariance with quantized weights (--quantize int8|int4) ----------------------------

def quantized_tiny_model(mode, init_std=0.2, cpu_kernels=True):
    """`cpu_kernels`: PyTorch's fused int8 / int4 CPU kernels, as load_for_inference uses on
    CPU; else torchao's own linears (dequantize, then a float matmul), as on CUDA."""
    from bastion.model.quantize import quantize_model, use_cpu_kernels

    model = tiny_model(init_std)
    quantize_model(model, mode)
    if cpu_kernels:
        assert use_cpu_kernels(model) == 14
    return model


@pytest.mark.parametrize("cpu_kernels", [True, False])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_greedy_is_batch_invariant_and_equals_generate(tok, mode, cpu_kernels):
    """Both quantized linears (the fused CPU kernels, torchao's dequantize-then-matmul) are
    row-independent: the rowwise mode stays bit-identical to generate(), alone or batched."""
    model = quantized_tiny_model(mode, cpu_kernels=cpu_kernels)
    with ban_eos(model, tok):
        expected = [generate(model, tok, p, limits=LIMITS, **kw) for p, kw in GREEDY]
        for max_batch_size, staggered in ((1, False), (4, False), (4, True)):
            got = run_engine(model, tok, GREEDY, max_batch_size=max_batch_size, staggered=staggered)
            assert got == expected, (max_batch_size, staggered)
    assert [len(r.token_ids) for r in expected] == [20, 7, 33, 12, 3]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_padded_mode_is_batch_invariant(tok, mode):
    model = quantized_tiny_model(mode)
    requests = GREEDY + [("The quick", dict(temperature=1.0, top_k=None, seed=7, max_new_tokens=25))]
    with ban_eos(model, tok):
        alone = [run_engine(model, tok, [r], max_batch_size=4, staggered=False, mode="padded")[0] for r in requests]
        together = run_engine(model, tok, requests, max_batch_size=4, staggered=True, mode="padded")
    assert together == alone


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_dynamic_mode_gives_the_same_greedy_tokens(tok, mode):
    model = quantized_tiny_model(mode)
    with ban_eos(model, tok):
        expected = [generate(model, tok, p, limits=LIMITS, **kw).token_ids for p, kw in GREEDY]
        got = run_engine(model, tok, GREEDY, max_batch_size=len(GREEDY), staggered=False, mode="dynamic")
    assert [r.token_ids for r in got] == expected


def test_padded_mode_streams_and_stops_like_the_others(model, tok):
    with ban_eos(model, tok), _Engine(model, tok, LIMITS, max_batch_size=3) as engine:
        assert engine.mode == "padded"
        full = submit(engine, tok, "The quick", max_new_tokens=40).result(timeout=10)
        cut = full.text[6:9]
        deltas, res = collect(submit(engine, tok, "The quick", max_new_tokens=40, stop=[cut]))
        assert "".join(deltas) == res.text == full.text[:full.text.find(cut)] and res.finish_reason == "stop"
    with pytest.raises(ValueError, match="mode"):
        _Engine(model, tok, LIMITS, mode="fast")


def test_seeded_sampling_is_batch_invariant(model, tok):
    requests = [
        ("The quick", dict(temperature=1.0, top_k=None, top_p=1.0, seed=1, max_new_tokens=25)),
        ("def main", dict(temperature=0.7, top_k=20, top_p=0.9, seed=2, max_new_tokens=30)),
        ("Über", dict(temperature=1.5, top_k=None, top_p=0.5, seed=3, max_new_tokens=18)),
        ("a", dict(max_new_tokens=22)),  # greedy, batched with the sampled ones
        ("The quick", dict(temperature=1.0, top_k=None, top_p=1.0, seed=4, max_new_tokens=25)),
    ]
    with ban_eos(model, tok):
        expected = [generate(model, tok, p, limits=LIMITS, **kw) for p, kw in requests]
        for max_batch_size, staggered in ((1, False), (4, False), (3, True)):
            assert run_engine(model, tok, requests, max_batch_size=max_batch_size, staggered=staggered) == expected
    assert expected[0].token_ids != expected[4].token_ids  # the seed matters


@pytest.mark.parametrize("mode", ["rowwise", "padded", "dynamic"])
def test_requests_with_one_prompt_share_one_prefill(model, tok, mode):
    """n completions of one prompt (GRPO's groups, n > 1): one prefill, the others copy its
    cache rows; each still samples with its own seed, exactly as it would alone."""
    same = [("The quick", dict(temperature=1.0, top_k=None, seed=s, max_new_tokens=12)) for s in range(4)]
    requests = same + [("def main", dict(temperature=1.0, seed=9, max_new_tokens=12))]
    with ban_eos(model, tok):
        expected = [generate(model, tok, p, limits=LIMITS, **kw) for p, kw in requests]
        engine = Engine(model, tok, LIMITS, max_batch_size=len(requests), mode=mode)
        handles = [submit(engine, tok, p, **kw) for p, kw in requests]  # all join at once
        shapes, handle = prefill_shapes(model)
        try:
            engine.start()
            results = [h.result(timeout=30) for h in handles]
        finally:
            handle.remove()
        engine.shutdown()
    # One row per distinct prompt: two prefills of one row, or (dynamic) one forward of two.
    assert [b for b, _ in shapes] == ([2] if mode == "dynamic" else [1, 1])
    assert len({tuple(r.token_ids) for r in results[:4]}) > 1  # each its own seed
    if mode == "rowwise":
        assert results == expected  # bit-identical to generate(), shared prefill or not
    else:
        assert [r.token_ids[0] for r in results] == [e.token_ids[0] for e in expected]  # from the prefill logits


# ---- text, stops, finish reasons -------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(), dict(stop=["e", "o"]), dict(temperature=1.0, seed=11, max_new_tokens=60),
    dict(temperature=1.0, seed=12, max_new_tokens=60, stop=["the", "東京"]),
    dict(temperature=2.0, seed=5, max_new_tokens=40),  # random bytes: partial characters held back
])
def test_stream_deltas_equal_generate_stream(model, tok, kw):
    with ban_eos(model, tok), Engine(model, tok, LIMITS, max_batch_size=3) as engine:
        expected = list(stream(model, tok, "Über 東", limits=LIMITS, **kw))
        handles = [submit(engine, tok, "Über 東", **kw) for _ in range(3)]
        for h in handles:
            deltas, result = collect(h)
            assert [*deltas, result] == expected
            assert not any(d.endswith("\ufffd") for d in deltas[:-1])


def test_stop_strings_and_stop_ids(model, tok):
    with ban_eos(model, tok), Engine(model, tok, LIMITS, max_batch_size=4) as engine:
        full = submit(engine, tok, "The quick", max_new_tokens=40).result(timeout=10)
        s = full.text[6:9]
        stop_id = full.token_ids[5]
        first = full.token_ids.index(stop_id)
        by_string = submit(engine, tok, "The quick", max_new_tokens=40, stop=["never-appears", s])
        by_id = submit(engine, tok, "The quick", max_new_tokens=40, stop_ids=[stop_id])
        _, res = collect(by_string)
        assert res.finish_reason == "stop" and res.text == full.text[:full.text.find(s)]
        assert res == generate(model, tok, "The quick", limits=LIMITS, max_new_tokens=40, stop=["never-appears", s])
        _, res = collect(by_id)
        assert res.finish_reason == "eos" and res.token_ids == full.token_ids[:first]
        assert res.text == tok.decode(full.token_ids[:first])


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=1.0, top_k=40, top_p=0.95, seed=21)],
                         ids=["greedy", "sampled"])
def test_rowwise_equals_generate_with_stop_strings_and_stop_ids(model, tok, sampling):
    # generate() and the rowwise engine share SequenceState: the same items, in the same
    # order, however a request ends (stop id, stop string, length), batched with the others.
    with ban_eos(model, tok):
        full = generate(model, tok, "The quick", limits=LIMITS, max_new_tokens=40, **sampling)
        unused = next(i for i in range(2, tok.vocab_size) if i not in full.token_ids)
        requests = [dict(max_new_tokens=40, stop_ids=[full.token_ids[6]]),
                    dict(max_new_tokens=40, stop=["never-appears", full.text[5:8]]),
                    dict(max_new_tokens=40, stop=[full.text[9:11]], stop_ids=[full.token_ids[4]]),
                    dict(max_new_tokens=40, stop=["never-appears"], stop_ids=[unused])]
        expected = [list(stream(model, tok, "The quick", limits=LIMITS, **kw, **sampling)) for kw in requests]
        with Engine(model, tok, LIMITS, max_batch_size=4) as engine:
            handles = [submit(engine, tok, "The quick", **kw, **sampling) for kw in requests]
            assert [list(h) for h in handles] == expected
    assert [items[-1].finish_reason for items in expected] in (["eos", "stop", "eos", "length"],
                                                               ["eos", "stop", "stop", "length"])


def test_max_new_tokens_gives_length(model, tok):
    with ban_eos(model, tok), Engine(model, tok, LIMITS, max_batch_size=2) as engine:
        res = submit(engine, tok, "The quick", max_new_tokens=9).result(timeout=10)
        default = submit(engine, tok, "The quick").result(timeout=10)
    assert res.finish_reason == "length" and len(res.token_ids) == 9
    assert res.prompt_tokens == len(ids(tok, "The quick"))
    assert default.finish_reason == "length" and len(default.token_ids) == LIMITS.max_new_tokens


def test_eos(model, tok):
    def force_eos(out):  # every row's next token is eos
        out = out.clone()
        out[..., tok.eos_id] = out.max() + 1
        return out

    with Engine(model, tok, LIMITS, max_batch_size=2) as engine:
        with OutputHook(model, force_eos):
            res = submit(engine, tok, "The quick").result(timeout=10)
        assert res == GenerationResult(text="", token_ids=[], prompt_tokens=2, finish_reason="eos", end_id=tok.eos_id)

        calls = []

        def eos_on_fourth_call(out):  # one request alone: prefill + 2 decode steps, then eos
            calls.append(1)
            return force_eos(out) if len(calls) >= 4 else ban_eos_logits(out)

        def ban_eos_logits(out):
            out = out.clone()
            out[..., tok.eos_id] = float("-inf")
            return out

        with OutputHook(model, eos_on_fourth_call):
            res = submit(engine, tok, "The quick").result(timeout=10)
        assert res.finish_reason == "eos" and len(res.token_ids) == 3
        assert tok.eos_id not in res.token_ids and res.text == tok.decode(res.token_ids)


# ---- async -------------------------------------------------------------------------------------

def test_async_iteration(model, tok):
    kws = [dict(max_new_tokens=30), dict(temperature=1.0, seed=3, max_new_tokens=25, stop=["the"]), dict()]
    with ban_eos(model, tok):
        expected = [list(stream(model, tok, p, limits=LIMITS, **kw)) for p, kw in zip(PROMPTS, kws)]

        async def main():
            loop = asyncio.get_running_loop()
            ticks = 0

            async def ticker():  # runs only if nothing blocks the loop
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0)

            async def consume(engine, prompt, kw):
                return [item async for item in submit(engine, tok, prompt, loop=loop, **kw)]

            engine = Engine(model, tok, LIMITS, max_batch_size=2)
            engine.start()
            ticking = asyncio.create_task(ticker())
            try:
                got = await asyncio.gather(*(consume(engine, p, kw) for p, kw in zip(PROMPTS, kws)))
            finally:
                ticking.cancel()
                await asyncio.to_thread(engine.shutdown)
            return got, ticks

        got, ticks = asyncio.run(main())
    assert got == expected
    assert ticks > 10


def test_iteration_mode_must_match_submit(model, tok):
    engine = Engine(model, tok, LIMITS, max_batch_size=1)
    sync_handle = submit(engine, tok, "a")
    with pytest.raises(TypeError, match="async for"):
        sync_handle.__aiter__()
    loop = asyncio.new_event_loop()
    try:
        async_handle = submit(engine, tok, "a", loop=loop)
        with pytest.raises(TypeError, match="async for"):
            iter(async_handle)
    finally:
        engine.shutdown()
        loop.close()


# ---- cancel, back-pressure, shutdown ------------------------------------------------------------

def test_cancel_frees_the_slot_for_a_waiting_request(model, tok):
    with ban_eos(model, tok), slow(model), Engine(model, tok, LIMITS, max_batch_size=1, max_queue=1) as engine:
        long = submit(engine, tok, "The quick", max_new_tokens=100)
        waiting = submit(engine, tok, "def main", max_new_tokens=5)
        wait_for(lambda: engine.stats["running"] == 1 and long._seq.text.ids)
        assert engine.stats["waiting"] == 1
        long.cancel()
        long.cancel()  # idempotent
        result = long.result(timeout=10)
        assert result.finish_reason == "cancelled" and 0 < len(result.token_ids) < 100
        assert result.text == tok.decode(result.token_ids)
        assert waiting.result(timeout=10).finish_reason == "length"
        waiting.cancel()  # after the end: a no-op
        assert_idle(engine)


def test_cancel_while_waiting(model, tok):
    engine = Engine(model, tok, LIMITS, max_batch_size=1, max_queue=2)  # not started: nothing runs
    first, second = submit(engine, tok, "a"), submit(engine, tok, "b")
    assert engine.stats == {"running": 0, "waiting": 2, "max_batch_size": 1, "max_queue": 2}
    second.cancel()
    assert engine.stats["waiting"] == 1
    assert second.result(timeout=1) == GenerationResult(text="", token_ids=[], prompt_tokens=1,
                                                        finish_reason="cancelled")
    engine.start()
    assert first.result(timeout=10).finish_reason in ("length", "eos")
    engine.shutdown()
    assert_idle(engine)


def test_queue_full(model, tok):
    engine = Engine(model, tok, LIMITS, max_batch_size=1, max_queue=2)
    handles = [submit(engine, tok, "a") for _ in range(3)]  # one for the free slot + max_queue waiting
    with pytest.raises(QueueFullError, match="max_queue=2"):
        submit(engine, tok, "a")
    handles[1].cancel()
    handles.append(submit(engine, tok, "a"))  # room again
    with pytest.raises(QueueFullError):
        submit(engine, tok, "a")
    engine.start()
    assert all(h.result(timeout=10).finish_reason != "cancelled" for h in handles if h is not handles[1])
    engine.shutdown()


def test_queue_full_while_running(model, tok):
    with ban_eos(model, tok), slow(model), Engine(model, tok, LIMITS, max_batch_size=2, max_queue=1) as engine:
        running = [submit(engine, tok, "a", max_new_tokens=60) for _ in range(2)]
        wait_for(lambda: engine.stats["running"] == 2)
        queued = submit(engine, tok, "a", max_new_tokens=2)
        with pytest.raises(QueueFullError):
            submit(engine, tok, "a")
        for h in running:
            h.cancel()
        assert queued.result(timeout=10).finish_reason == "length"


def test_shutdown_finishes_in_flight_requests_and_refuses_new(model, tok):
    engine = Engine(model, tok, LIMITS, max_batch_size=2, max_queue=8)
    engine.start()
    with ban_eos(model, tok):
        handles = [submit(engine, tok, p, max_new_tokens=15) for p in PROMPTS]  # 2 running, 3 queued
        engine.shutdown()
        assert [h.result(timeout=1).finish_reason for h in handles] == ["length"] * 5
    assert not engine._thread.is_alive()
    with pytest.raises(EngineClosedError):
        submit(engine, tok, "a")
    with pytest.raises(EngineClosedError):
        engine.start()
    engine.shutdown()  # again: a no-op
    assert_idle(engine)


def test_shutdown_timeout_cancels_the_rest(model, tok):
    engine = Engine(model, tok, LIMITS, max_batch_size=1, max_queue=4)
    engine.start()
    with ban_eos(model, tok), slow(model):
        handles = [submit(engine, tok, "The quick", max_new_tokens=100) for _ in range(3)]
        wait_for(lambda: handles[0]._seq.text.ids)
        start = time.monotonic()
        engine.shutdown(timeout=0.05)
        assert time.monotonic() - start < 5
    results = [h.result(timeout=1) for h in handles]
    assert [r.finish_reason for r in results] == ["cancelled"] * 3
    assert 0 < len(results[0].token_ids) < 100 and results[2].token_ids == []
    assert_idle(engine)


def test_shutdown_before_start_cancels_the_queue(model, tok):
    engine = Engine(model, tok, LIMITS)
    handle = submit(engine, tok, "a")
    engine.shutdown()
    assert handle.result(timeout=1).finish_reason == "cancelled"
    with pytest.raises(EngineClosedError):
        submit(engine, tok, "a")


def test_a_failing_step_fails_its_requests_only(model, tok):
    boom = threading.Event()

    def fail(out):
        if boom.is_set():
            raise RuntimeError("device on fire")

    with OutputHook(model, fail), Engine(model, tok, LIMITS, max_batch_size=2) as engine:
        boom.set()
        handle = submit(engine, tok, "The quick")
        with pytest.raises(RuntimeError, match="device on fire"):
            list(handle)
        boom.clear()
        assert submit(engine, tok, "The quick", max_new_tokens=3).result(timeout=10).finish_reason in ("length", "eos")
        assert_idle(engine)


def test_no_state_left_after_many_requests(model, tok):
    with Engine(model, tok, LIMITS, max_batch_size=4, max_queue=200, threads=1) as engine:
        handles = [submit(engine, tok, PROMPTS[i % 5], max_new_tokens=1 + i % 3) for i in range(200)]
        results = [h.result(timeout=30) for h in handles]
        assert all(r.finish_reason in ("length", "eos") for r in results)
        assert_idle(engine)
        assert engine._thread.is_alive()


# ---- limits -----------------------------------------------------------------------------------

def test_params_defaults_come_from_limits(model, tok):
    engine = Engine(model, tok, GenerateConfig(max_new_tokens=7, temperature=0.5, top_k=3, top_p=0.9))
    assert engine.params(4) == SamplingParams(max_new_tokens=7, temperature=0.5, top_k=3, top_p=0.9, seed=None)
    p = engine.params(4, max_new_tokens=2, temperature=0, top_k=None, top_p=1.0, seed=5, stop=["x"], stop_ids=[3, 3, 1])
    # None means "the default", as in generate(): top_k stays the limits' 3
    assert p == SamplingParams(max_new_tokens=2, temperature=0, top_k=3, top_p=1.0, seed=5, stop=("x",),
                               stop_ids=(3, 1))


@pytest.mark.parametrize("prompt_len, kw, match", [
    (5, dict(max_new_tokens=101), r"max_new_tokens \(101\) exceeds .*max_new_tokens_ceiling"),
    (5, dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (0, dict(), "prompt is empty"),
    (100, dict(max_new_tokens=29), r"exceeds the model's context size \(128\)"),
    (5, dict(stop=["a"] * 9), "max_stop_strings"),
    (5, dict(stop="stop"), "stop must be a list"),
    (5, dict(temperature=-0.5), "temperature"),
    (5, dict(top_k=0), "top_k"),
    (5, dict(top_p=0.0), "top_p"),
    (5, dict(seed=-1), "seed"),
    (5, dict(stop_ids=5), "stop_ids"),
    (5, dict(stop_ids=[300]), "stop_ids"),
    (5, dict(stop_ids=[True]), "stop_ids"),
])
def test_limit_errors(model, tok, prompt_len, kw, match):
    engine = Engine(model, tok, LIMITS)
    with pytest.raises(GenerationLimitError, match=match):
        engine.params(prompt_len, **kw)


def test_submit_checks_prompt_and_hand_built_params(model, tok):
    engine = Engine(model, tok, LIMITS)
    ok = engine.params(3)
    for prompt in ([], [300], [-1], [True], "abc"):
        with pytest.raises(GenerationLimitError, match=r"prompt ids must be a non-empty list|token id .* outside"):
            engine.submit(prompt, ok)
    too_long = SamplingParams(max_new_tokens=126, temperature=0.0, top_k=None, top_p=1.0, seed=None)
    with pytest.raises(GenerationLimitError, match="max_new_tokens_ceiling"):
        engine.submit([1, 2, 3], too_long)
    with pytest.raises(GenerationLimitError, match="context size"):  # params made for a shorter prompt
        engine.submit([1] * 40, engine.params(3, max_new_tokens=100))
    with pytest.raises(GenerationLimitError, match="top_p"):
        engine.submit([1, 2, 3], SamplingParams(max_new_tokens=3, temperature=1.0, top_k=None, top_p=2.0, seed=None))
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.submit([1, 2, 3], {"max_new_tokens": 3})
    assert engine.stats["waiting"] == 0


@pytest.mark.parametrize("kw", [dict(max_batch_size=0), dict(max_queue=-1), dict(max_batch_size=True), dict(threads=0)])
def test_engine_arguments_are_checked(model, tok, kw):
    with pytest.raises(ValueError):
        Engine(model, tok, LIMITS, **kw)


# ---- logprobs ----------------------------------------------------------------------------------

def full_forward_logprobs(model, ids):
    """log-softmax of one plain forward over all of `ids`: row i predicts token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)


def test_generate_logprobs_are_the_models_own_for_prompt_and_completion(tok):
    model = tiny_model()
    prompt = tok.encode_prompt("The quick brown")
    result = generate(model, tok, prompt, limits=LIMITS, max_new_tokens=12, temperature=0.9, seed=3, logprobs=4,
                      prompt_logprobs=True)
    ids = prompt + result.token_ids
    reference = full_forward_logprobs(model, ids)
    assert len(result.logprobs) == len(result.token_ids) and len(result.prompt_logprobs) == len(prompt) - 1
    for position, entry in zip(range(1, len(ids)), result.prompt_logprobs + result.logprobs):
        assert entry.token_id == ids[position]
        assert entry.logprob == pytest.approx(reference[position - 1, ids[position]].item(), abs=1e-4)
        assert len(entry.top) == 4 and [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert entry.top[0][0] == reference[position - 1].argmax().item()
    plain = generate(model, tok, prompt, limits=LIMITS, max_new_tokens=12, temperature=0.9, seed=3)
    assert plain.token_ids == result.token_ids and plain.logprobs is None and plain.prompt_logprobs is None


def test_the_end_token_has_no_logprob_entry(tok):
    model = tiny_model()
    eos_first = OutputHook(model, lambda out: out.index_fill(-1, torch.tensor([tok.eos_id]), 1e4))
    with eos_first:
        result = generate(model, tok, "The quick", limits=LIMITS, logprobs=0)
    assert result.finish_reason == "eos" and result.token_ids == [] and result.logprobs == []


@pytest.mark.parametrize("mode", ["rowwise", "padded", "dynamic"])
def test_engine_logprobs_match_generate_and_do_not_depend_on_the_batch(tok, mode):
    model = tiny_model()
    requests = [(p, dict(max_new_tokens=n, logprobs=2, prompt_logprobs=i % 2 == 0))
                for i, (p, n) in enumerate(zip(PROMPTS, [20, 7, 33, 12, 3]))]
    with ban_eos(model, tok):
        expected = [generate(model, tok, p, limits=LIMITS, **kw) for p, kw in requests]
        alone = [run_engine(model, tok, [r], max_batch_size=4, staggered=False, mode=mode)[0] for r in requests]
        together = run_engine(model, tok, requests, max_batch_size=4, staggered=False, queued_first=True, mode=mode)
    for want, one, batched in zip(expected, alone, together):
        for got in (one, batched):
            assert got.token_ids == want.token_ids
            assert [e.token_id for e in got.logprobs] == want.token_ids
            assert [e.logprob for e in got.logprobs] == pytest.approx([e.logprob for e in want.logprobs], abs=1e-4)
            assert (got.prompt_logprobs is None) == (want.prompt_logprobs is None)
            if want.prompt_logprobs is not None:
                assert [e.logprob for e in got.prompt_logprobs] == pytest.approx(
                    [e.logprob for e in want.prompt_logprobs], abs=1e-4)
        if mode != "dynamic":  # batch-invariant modes: alone or batched, bit for bit
            assert batched.logprobs == one.logprobs and batched.prompt_logprobs == one.prompt_logprobs


def test_logprobs_settings_are_bounded(tok):
    model = tiny_model()
    for bad in (21, -1, True, 1.5):
        with pytest.raises(GenerationLimitError, match="logprobs must be an integer in"):
            generate(model, tok, "a", limits=LIMITS, logprobs=bad)
    with pytest.raises(GenerationLimitError, match="prompt_logprobs needs logprobs"):
        generate(model, tok, "a", limits=LIMITS, prompt_logprobs=True)


# ---- per-request logit adjustments (min_p, penalties, logit_bias) -------------------------------

ADJUSTED = [("The quick", dict(max_new_tokens=20, repetition_penalty=1.3)),
            ("def main():\n", dict(max_new_tokens=15, frequency_penalty=1.5, presence_penalty=0.5)),
            ("a", dict(max_new_tokens=12, temperature=0.8, seed=4, min_p=0.2, logit_bias={5: 3.0, 7: -100.0})),
            ("Über café", dict(max_new_tokens=10, temperature=1.0, seed=9, top_k=5, min_p=0.05,
                              presence_penalty=-0.5))]


def test_logit_bias_forces_and_bans_tokens(tok):
    model = tiny_model()
    with ban_eos(model, tok):
        plain = generate(model, tok, "The quick", limits=LIMITS, max_new_tokens=8)
        banned = generate(model, tok, "The quick", limits=LIMITS, max_new_tokens=8,
                          logit_bias={plain.token_ids[0]: -100.0})
        forced = generate(model, tok, "The quick", limits=LIMITS, max_new_tokens=8, logit_bias={42: 100.0})
    assert banned.token_ids[0] != plain.token_ids[0]
    assert forced.token_ids == [42] * 8


def test_penalties_cut_repetition(tok):
    model = tiny_model()
    with ban_eos(model, tok):
        plain = generate(model, tok, "The quick", limits=LIMITS, max_new_tokens=40)
        penalized = generate(model, tok, "The quick", limits=LIMITS, max_new_tokens=40, frequency_penalty=2.0,
                             presence_penalty=2.0)
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))


@pytest.mark.parametrize("mode", ["rowwise", "padded"])
def test_adjusted_sampling_equals_generate_and_is_batch_invariant(tok, mode):
    model = tiny_model()
    with ban_eos(model, tok):
        expected = [generate(model, tok, p, limits=LIMITS, **kw).token_ids for p, kw in ADJUSTED]
        alone = [run_engine(model, tok, [r], max_batch_size=4, staggered=False, mode=mode)[0] for r in ADJUSTED]
        together = run_engine(model, tok, ADJUSTED, max_batch_size=4, staggered=True, mode=mode)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    if mode == "rowwise":
        assert [r.token_ids for r in alone] == expected


@pytest.mark.parametrize("kw, match", [
    (dict(min_p=1.5), "min_p must be a number in"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(frequency_penalty=3), "frequency_penalty"), (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(logit_bias={300: 1.0}), r"logit_bias: token ids must be in \[0, 300\)"),
    (dict(logit_bias={1: 101}), r"logit_bias\[1\] must be a number in"), (dict(logit_bias=[1]), "logit_bias must map"),
])
def test_adjustment_settings_are_bounded(tok, kw, match):
    with pytest.raises(GenerationLimitError, match=match):
        generate(tiny_model(), tok, "a", limits=LIMITS, **kw)


# ---- chunked prefill, prefix caching --------------------------------------------------------------

SYSTEM = "You are a careful assistant. Answer briefly and exactly. "  # a shared prompt prefix


def prefix_engine(model, tok, **kw):
    settings = dict(max_batch_size=4, mode="padded", prefill_chunk=4, prefix_cache_blocks=64)
    return _Engine(model, tok, LIMITS, **{**settings, **kw})


def results_of(engine, tok, requests, namespace=""):
    """Requests one after the other (each sees the cache the ones before it filled)."""
    out = []
    for prompt, kw in requests:
        prompt_ids = ids(tok, prompt)
        out.append(engine.submit(prompt_ids, engine.params(len(prompt_ids), **kw),
                                 cache_namespace=namespace).result(timeout=30))
    return out


SHARED = [(SYSTEM + q, dict(max_new_tokens=12, logprobs=2, **s)) for q, s in
          [("The quick", {}), ("def main", dict(temperature=1.0, seed=3)), ("Über café", {}), ("The quick", {})]]


@pytest.mark.parametrize("init_std, dtype", [(0.2, torch.float32), (0.02, torch.float32), (0.02, torch.bfloat16)])
def test_prefix_cache_hits_give_bit_identical_tokens_and_logprobs(tok, init_std, dtype):
    """Each request alone on a fresh engine (a cold prefill) vs after the others on one
    engine (its shared prefix's blocks read from the cache): the same tokens and logprobs,
    bit for bit, and the hits are counted."""
    model = tiny_model(init_std).to(dtype)
    with ban_eos(model, tok):
        cold = []
        for r in SHARED:
            with prefix_engine(model, tok) as engine:
                cold += results_of(engine, tok, [r])
        with prefix_engine(model, tok) as engine:
            warm = results_of(engine, tok, SHARED)
            stats = engine.prefix_cache_stats
            assert_idle(engine)
    assert warm == cold
    prefix_blocks = len(ids(tok, SYSTEM)) // 4
    assert prefix_blocks >= 3
    assert stats["hit_tokens"] >= 3 * prefix_blocks * 4  # the 2nd, 3rd and 4th requests reuse the prefix
    assert stats["queried_tokens"] == sum(len(ids(tok, p)) for p, _ in SHARED)
    assert 0 < stats["blocks_used"] <= 64


def test_prefix_cache_is_per_namespace_and_bounded(tok):
    model = tiny_model()
    with ban_eos(model, tok), prefix_engine(model, tok, prefix_cache_blocks=3) as engine:
        first = results_of(engine, tok, SHARED[:1], namespace="key_a")
        hits = engine.prefix_cache_stats["hit_tokens"]
        again = results_of(engine, tok, SHARED[:1], namespace="key_b")  # another namespace: no hit
        assert engine.prefix_cache_stats["hit_tokens"] == hits == 0 and again == first
        results_of(engine, tok, SHARED[:1], namespace="key_b")  # its own namespace: hits
        assert engine.prefix_cache_stats["hit_tokens"] > 0
        stats = engine.prefix_cache_stats
    assert stats["blocks_used"] == 3 and stats["evictions"] > 0  # never more than the bound


def test_block_keys_chain_the_prefix_and_the_namespace():
    from bastion.infer.prefix_cache import block_keys

    a = block_keys("", list(range(10)), 4)
    assert len(a) == 2  # two full blocks; the partial third has no key
    assert block_keys("", list(range(8)) + [99], 4) == a  # the same first 8 tokens
    assert block_keys("", [1] + list(range(1, 10)), 4)[1] != a[1]  # block 1's key depends on block 0
    assert block_keys("adapter", list(range(10)), 4)[0] != a[0]


def test_prompt_logprobs_requests_prefill_every_chunk(tok):
    model = tiny_model()
    request = (SYSTEM + "The quick", dict(max_new_tokens=5, logprobs=1, prompt_logprobs=True))
    with ban_eos(model, tok), prefix_engine(model, tok) as engine:
        first, second = results_of(engine, tok, [request, request])
        assert engine.prefix_cache_stats["hit_tokens"] == 0
        expected = generate(model, tok, ids(tok, request[0]), limits=LIMITS, **request[1])
    assert first == second and first.token_ids == expected.token_ids
    assert [e.logprob for e in first.prompt_logprobs] == pytest.approx(
        [e.logprob for e in expected.prompt_logprobs], abs=1e-4)


def test_a_long_prompt_prefills_in_chunks_between_decode_steps(tok):
    """One chunk of the joining prompt per step: the running stream keeps decoding while it
    prefills, and neither output changes (the same as each alone)."""
    model = tiny_model()
    long_prompt = (SYSTEM * 2, dict(max_new_tokens=5))
    running = ("The quick", dict(max_new_tokens=60))
    events = []
    watch = model.tok_embeddings.register_forward_hook(
        lambda module, args, out: events.append("prefill" if args[0].size(0) == 1 and args[0].size(1) > 1
                                                else "decode"))
    try:
        with ban_eos(model, tok):
            alone = [run_engine(model, tok, [r], max_batch_size=2, staggered=False, mode="padded", prefill_chunk=4,
                                prefill_step_tokens=4)[0] for r in (running, long_prompt)]
            events.clear()
            together = run_engine(model, tok, [running, long_prompt], max_batch_size=2, staggered=True,
                                  mode="padded", prefill_chunk=4, prefill_step_tokens=4)
    finally:
        watch.remove()
    assert together == alone
    chunks = -(-len(ids(tok, long_prompt[0])) // 4)
    first, last = events.index("prefill"), len(events) - 1 - events[::-1].index("prefill")
    # The running stream's first prompt is one chunk; the long one's chunks alternate with decodes.
    assert events[first + 1:last].count("decode") >= chunks - 2
    assert events.count("prefill") == chunks + 1


def test_engine_checks_prefill_and_prefix_settings(model, tok):
    for kw in (dict(prefill_chunk=0), dict(prefill_step_tokens=0), dict(prefix_cache_blocks=-1),
               dict(prefix_cache_blocks=True)):
        with pytest.raises(ValueError):
            _Engine(model, tok, LIMITS, **kw)
    with pytest.raises(TypeError, match="cache_namespace"):
        _Engine(model, tok, LIMITS).submit([1, 2], _Engine(model, tok, LIMITS).params(2), cache_namespace=None)
    assert _Engine(model, tok, LIMITS, mode="dynamic", prefix_cache_blocks=8).prefix_cache_stats is None


@pytest.mark.parametrize("mode", ["padded", "rowwise"])
def test_kv_memory_follows_the_requests(model, tok, mode):
    """Each request holds a cache for its own prompt and budget only while it runs; the
    engine holds nothing up front (dynamic mode keeps its one shared cache)."""
    per_position = 2 * model.cfg.n_layer * model.cfg.kv_heads * model.cfg.head_dim * 4  # float32 keys + values
    with ban_eos(model, tok), slow(model), _Engine(model, tok, LIMITS, max_batch_size=8, mode=mode) as engine:
        assert engine.kv_cache_bytes == 0
        handles = [submit(engine, tok, "The quick", max_new_tokens=90), submit(engine, tok, "a", max_new_tokens=80)]
        wait_for(lambda: all(h._seq.text.ids for h in handles))
        assert engine.kv_cache_bytes == (len(ids(tok, "The quick")) + 90 + len(ids(tok, "a")) + 80) * per_position
        for h in handles:
            h.cancel()
            h.result(timeout=30)
        assert engine.kv_cache_bytes == 0
        assert_idle(engine)
    dynamic = _Engine(model, tok, LIMITS, max_batch_size=8, mode="dynamic")
    assert dynamic.kv_cache_bytes == 8 * dynamic._cache.max_len * per_position
