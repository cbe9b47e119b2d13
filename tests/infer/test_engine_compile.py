"""Engine(compile=True): the padded mode's decode step with its position-wise pieces compiled
(bastion/infer/compiled.py). The compiling tests are slow (a compile takes tens of seconds on
a shared 2-core CPU); the argument checks are not."""
import pytest
import torch

from bastion.config.schema import GenerateConfig, ModelConfig
from bastion.infer.engine import Engine, invariant_tile_rows
from bastion.model import Transformer
from bastion.model.transformer import EAGER_ROW_STEPS
from bastion.tokenizer import BastionTokenizer

LIMITS = GenerateConfig(max_new_tokens=12, max_new_tokens_ceiling=40, temperature=0.0, top_k=None)
PROMPTS = [[5, 6, 7], [11], list(range(20, 45)), [9, 9, 9, 9, 9, 9, 9], list(range(60, 100))]


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=300, d_model=64, n_layer=3, n_head=4, n_kv_head=2, max_seq_len=128,
                                   init_std=0.2)).eval()


@pytest.fixture(scope="module")
def tok() -> BastionTokenizer:
    return BastionTokenizer.train(["The quick brown fox jumps over the lazy dog. def main(): return 42"] * 8,
                                  vocab_size=300, min_frequency=1)


def test_compile_is_for_the_padded_mode_and_the_cache_for_compile(tok):
    with pytest.raises(ValueError, match="compile needs the padded mode"):
        Engine(tiny_model(), tok, LIMITS, mode="rowwise", compile=True)
    with pytest.raises(ValueError, match="pass compile=True as well"):
        Engine(tiny_model(), tok, LIMITS, compile_cache=object())


def test_decode_rows_in_pieces_is_the_eager_decode_step():
    """decode_rows through EAGER_ROW_STEPS (what compile wraps) computes what it always did:
    each piece position-wise, the per-row attention between them."""
    model = tiny_model()
    caches = [model.new_cache(1, max_len=8) for _ in range(3)]
    with torch.inference_mode():
        model.decode_rows([1, 2, 3], caches, [0, 0, 0], pad_to=4)
        pieces = model.decode_rows([4, 5, 6], caches, [1, 1, 1], pad_to=4, steps=EAGER_ROW_STEPS)
        x = model.tok_embeddings(torch.tensor([[4], [5], [6], [0]]))
        pos = torch.tensor([1, 1, 1, 0])
        cos, sin = model.rope_cos[pos].view(4, 1, 1, -1), model.rope_sin[pos].view(4, 1, 1, -1)
        replay = [model.new_cache(1, max_len=8) for _ in range(3)]
        model.decode_rows([1, 2, 3], replay, [0, 0, 0], pad_to=4)
        for i, layer in enumerate(model.layers):  # Block.forward's math, attention per row
            h = layer.attention_norm(x)
            q, k, v = layer.attention.project_rows(h, cos, sin)
            x = x + layer.attention.wo(layer.attention.attend_rows(q, k, v, replay, i, [1, 1, 1], None))
            x = x + layer.feed_forward(layer.ffn_norm(x))
        assert torch.equal(pieces, model.output(model.norm(x))[:3, -1])


def compiles_so_far() -> int:
    """Frames Dynamo has compiled in this process (any code): the recompile counter."""
    return int(torch._dynamo.utils.counters["frames"]["ok"])


def run(engine, prompts, **params):
    handles = [engine.submit(p, engine.params(len(p), logprobs=1, **params)) for p in prompts]
    return [h.result(timeout=600) for h in handles]


@pytest.mark.slow
def test_compiled_engine_is_batch_invariant_close_to_eager_and_never_recompiles(tok):
    model = tiny_model()
    eager = Engine(model, tok, LIMITS, max_batch_size=4, threads=1)
    compiled = Engine(model, tok, LIMITS, max_batch_size=4, threads=1, compile=True)
    with eager, compiled:
        assert compiled.compile_notes[0].startswith("compile done: decode step compiled")
        before = compiles_so_far()
        # Alone, then all at once (4 slots: tiles of every size, a queue, lengths 1 to 40 + 12).
        alone = [run(compiled, [p])[0] for p in PROMPTS]
        together = run(compiled, PROMPTS)
        sampled_alone = [run(compiled, [p], temperature=1.0, seed=i)[0] for i, p in enumerate(PROMPTS)]
        sampled_together = [h for h in run(compiled, PROMPTS, temperature=1.0, seed=0)]
        assert compiles_so_far() == before, "a request recompiled a piece after the start"
        reference = run(eager, PROMPTS)
    assert [r.token_ids for r in alone] == [r.token_ids for r in together]
    assert [r.logprobs for r in alone] == [r.logprobs for r in together]  # bit for bit
    assert sampled_alone[0].token_ids == sampled_together[0].token_ids
    # Inductor may round differently from eager (fused norms): the same tokens, close logprobs.
    assert [r.token_ids for r in alone] == [r.token_ids for r in reference]
    for mine, theirs in zip(alone, reference):
        assert [t.logprob for t in mine.logprobs] == pytest.approx([t.logprob for t in theirs.logprobs], abs=1e-4)


@pytest.mark.slow
def test_the_tile_probe_measures_the_compiled_pieces():
    """The probe's row range holds for the compiled pieces it was measured on."""
    from bastion.infer.compiled import compiled_row_steps

    model, steps = tiny_model(), compiled_row_steps()
    with torch.inference_mode():
        lo, hi = invariant_tile_rows(model, 8, steps)
        tokens = [3, 1, 4, 1, 5, 9, 2, 6][:hi]
        caches = [model.new_cache(1, max_len=1) for _ in tokens]
        widest = model.decode_rows(tokens, caches, [0] * hi, pad_to=hi, steps=steps)
        for p in range(lo, hi + 1):
            assert torch.equal(model.decode_rows(tokens[:p], caches[:p], [0] * p, pad_to=p, steps=steps), widest[:p])


@pytest.mark.slow
@pytest.mark.parametrize("precision", [{"quantize": "int8"}, {"quantize": "int4"}, {"dtype": "bfloat16"}])
def test_quantized_and_bf16_models_compile_and_stay_batch_invariant(tmp_path, precision):
    from helpers import make_base_checkpoint

    from bastion.infer.loading import load_for_inference

    if "quantize" in precision:
        pytest.importorskip("torchao")
    loaded = load_for_inference(make_base_checkpoint(tmp_path / "base", seed=1), **precision)
    with Engine(loaded.model, loaded.tokenizer, LIMITS, max_batch_size=4, threads=1, compile=True) as engine:
        assert engine.compile_notes[0].startswith("compile done"), engine.compile_notes
        alone = [run(engine, [p])[0] for p in PROMPTS[:4]]
        together = run(engine, PROMPTS[:4])
    assert [r.token_ids for r in alone] == [r.token_ids for r in together]
    assert [r.logprobs for r in alone] == [r.logprobs for r in together]
