"""Grammar-constrained decoding below the server: the constraint in generate() and the
engine (every mode, batched with free requests), the tool-call grammar, bounds on schemas."""
import json

import jsonschema
import pytest
import torch

from bastion.config.presets import model_config
from bastion.config.schema import GenerateConfig
from bastion.infer import generate
from bastion.infer.engine import Engine
from bastion.infer.structured import Constraint, GrammarError, check_schema, compile_grammar, json_grammar, lark_grammar
from bastion.model import Transformer
from bastion.tokenizer import BastionTokenizer
from bastion.tokenizer.tools import call_grammar, check_tools

CORPUS = ["The quick brown fox jumps over the lazy dog. {\"a\": 1, \"b\": [true, null]}"] * 20
LIMITS = GenerateConfig(max_new_tokens=120, max_new_tokens_ceiling=200, temperature=1.0, top_k=None)
SCHEMA = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 6},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "ok": {"type": "boolean"}},
          "required": ["word", "n", "ok"], "additionalProperties": False}
TOOLS = check_tools([{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a"], "additionalProperties": False}}}])


@pytest.fixture(scope="module")
def tok():
    return BastionTokenizer.train(CORPUS, vocab_size=300, min_frequency=2)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return Transformer(model_config("tiny", vocab_size=tok.vocab_size, init_std=0.2)).eval()


def grammar(tok, model, schema=SCHEMA):
    return compile_grammar(json_grammar(check_schema(schema)), tok, model.cfg.vocab_size, [tok.eos_id])


def test_generate_under_a_schema_always_validates(model, tok):
    g = grammar(tok, model)
    for seed in range(8):
        result = generate(model, tok, "The quick", limits=LIMITS, seed=seed, grammar=g)
        assert result.finish_reason == "eos", result
        jsonschema.validate(json.loads(result.text), SCHEMA)


def test_the_engine_constrains_every_mode_without_batch_effects(model, tok):
    g = grammar(tok, model)
    prompt = tok.encode("The lazy")
    alone = generate(model, tok, prompt, limits=LIMITS, seed=7, grammar=g)
    for mode in ("padded", "rowwise", "dynamic"):
        with Engine(model, tok, LIMITS, max_batch_size=4, mode=mode) as engine:
            free = [engine.submit(prompt, engine.params(len(prompt), seed=s)) for s in range(3)]
            held = engine.submit(prompt, engine.params(len(prompt), seed=7, grammar=g))
            result = held.result(timeout=300)
            for h in free:
                h.result(timeout=300)
        jsonschema.validate(json.loads(result.text), SCHEMA)
        if mode != "dynamic":  # dynamic mode may differ in the last bits with its batch
            assert result.token_ids == alone.token_ids, mode


def test_the_constraint_forces_the_end_where_nothing_can_follow(model, tok):
    g = compile_grammar(json_grammar(check_schema({"enum": [{"k": 1}]})), tok, model.cfg.vocab_size, [tok.eos_id])
    result = generate(model, tok, "x", limits=LIMITS, seed=0, grammar=g)
    assert (result.text, result.finish_reason) == ('{"k": 1}', "eos")


def _walk(tok, vocab_size, lark, text):
    """Feed `text`'s tokens through a Constraint: (all allowed, the end allowed after)."""
    c = Constraint(compile_grammar(lark_grammar(lark), tok, vocab_size, [tok.eos_id]), tok, vocab_size,
                   frozenset({tok.eos_id}))
    for token in tok.encode(text):
        if not c.allowed()[token]:
            return False, False
        c.consume(token)
    return True, bool(c.allowed()[tok.eos_id])


def test_tool_call_grammar_under_each_choice(model, tok):
    v = model.cfg.vocab_size
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 3}}\n</tool_call>'
    auto, required = call_grammar(TOOLS, "auto", parallel=True), call_grammar(TOOLS, "required", parallel=False)
    assert _walk(tok, v, auto, "The answer is two.") == (True, True)
    assert _walk(tok, v, auto, call) == (True, True)
    assert _walk(tok, v, auto, call + "\n" + call) == (True, True)  # parallel calls
    assert _walk(tok, v, auto, "<tool_call>\nnot json")[0] is False  # once opened, a call it is
    assert _walk(tok, v, required, call) == (True, True)
    assert _walk(tok, v, required, "The answer")[0] is False
    assert _walk(tok, v, required, call + "\n" + call)[0] is False  # parallel_tool_calls: false
    assert _walk(tok, v, required, call.replace('"a": 3', '"a": 12'))[0] is False  # its parameters' schema
    assert _walk(tok, v, call_grammar(TOOLS, "add", parallel=False), call) == (True, True)


def test_schema_bounds_and_refusals(model, tok):
    with pytest.raises(GrammarError, match="nested more than 4"):
        check_schema({"a": {"b": {"c": {"d": {}}}}}, max_depth=4)
    with pytest.raises(GrammarError, match="over this server's limit of 100"):
        check_schema({"enum": ["x" * 200]}, max_bytes=100)
    with pytest.raises(GrammarError, match="x-guidance"):
        check_schema({"x-guidance": {"lenient": True}})
    with pytest.raises(GrammarError, match="must be a JSON object"):
        check_schema(["not", "a", "schema"])
    for value in (float("inf"), float("-inf"), float("nan")):  # what Python's json.loads makes of Infinity / NaN
        with pytest.raises(GrammarError, match="tools.0: .*non-finite number"):
            check_schema({"type": "object", "minimum": value}, where="tools.0: schema")
    with pytest.raises(GrammarError, match="refused"):
        grammar(tok, model, {"$ref": "#/$defs/nowhere"})
    deep = {"type": "array", "items": {}}
    inner = deep
    for _ in range(60):  # deep but under the server's depth cap of 64 levels of JSON
        inner["items"] = {"type": "array", "items": {}}
        inner = inner["items"]
    check_schema(deep, max_depth=200)
    grammar(tok, model, deep)  # llguidance compiles it within its limits


def test_generate_command_takes_a_json_schema_file(tmp_path):
    from helpers import make_base_checkpoint
    from typer.testing import CliRunner

    from bastion.cli import app

    ckpt = str(make_base_checkpoint(tmp_path / "tiny", seed=2, max_seq_len=256))
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    runner = CliRunner()
    for seed in ("1", "2"):
        out = runner.invoke(app, ["generate", "--checkpoint", ckpt, "--prompt", "x", "--seed", seed, "--temperature",
                                  "1", "--max-new-tokens", "60", "--json-schema", str(tmp_path / "schema.json"),
                                  "--json"])
        assert out.exit_code == 0, out.output
        jsonschema.validate(json.loads(json.loads(out.output)["completion"]), SCHEMA)
    (tmp_path / "bad.json").write_text(json.dumps({"$ref": "#/nowhere"}))
    out = runner.invoke(app, ["generate", "--checkpoint", ckpt, "--prompt", "x", "--json-schema",
                              str(tmp_path / "bad.json")])
    assert out.exit_code != 0 and "refused this schema" in out.output
    (tmp_path / "big.json").write_text(json.dumps({"enum": ["x" * 70_000]}))
    out = runner.invoke(app, ["generate", "--checkpoint", ckpt, "--prompt", "x", "--json-schema",
                              str(tmp_path / "big.json")])
    assert out.exit_code != 0 and "JSON schema" in out.output
