"""lm-eval against `bastion serve` and against the `bastion export hf` folder of the same
checkpoint: the same local tasks, the same numbers, sample by sample.

Builds a small model trained for 200 steps on the synthetic agreement grammar
(tests/synthetic/grammar_model.py), exports it with `bastion export hf`, serves the checkpoint
on 127.0.0.1 in this process (API keys required: lm-eval sends `OPENAI_API_KEY`), writes two
local lm-eval tasks (task YAML + JSONL, nothing downloaded) and runs lm-eval 0.4.13's
`simple_evaluate(..., log_samples=True)` on them through

  hf            lm-eval's `hf` model on the export folder (transformers, float32, CPU)
  completions   `local-completions` on /v1/completions, token-id requests
                (tokenized_requests=True, the export's tokenizer), 4 requests in flight
  completions-text  the same with tokenized_requests=False (text prompts, the server tokenizes)
  chat          `local-chat-completions` on /v1/chat/completions (generation task only),
                compared with `hf` under apply_chat_template=True

And on a second model whose tokenizer adds BOS (a random 1-layer Llama through `bastion
import hf` / `export hf`), the multiple-choice task through local-completions with token ids
and add_bos_token=True (must equal hf), and, recorded as expected to differ, without
add_bos_token and with text prompts.

Tasks: `bastion_agreement` (multiple_choice: which verb form continues the sentence - the
verb alone, with "the", or with the rest of the sentence - acc / acc_norm; a quarter of the
continuations end the document, so the model's next token after them is its end of text)
and `bastion_agreement_gen` (generate_until: the verb the model writes after a subject,
exact_match against the verbs that agree).
Checked: every loglikelihood within LL_TOLERANCE nats of hf's, is_greedy, generated strings
and per-sample metrics identical, aggregate acc / acc_norm / exact_match identical.
Not part of `make test` (lm_eval is not a dependency); tests/eval/test_lm_eval_parity.py
runs it under `-m slow`. Run it with lm_eval on the path:

    .venv/bin/pip install --no-deps --target /tmp/lmtarget lm_eval==0.4.13 evaluate pytablewriter \\
        rouge-score sacrebleu scikit-learn word2number more_itertools sqlitedict aiohttp tenacity \\
        aiohappyeyeballs aiosignal frozenlist multidict propcache yarl DataProperty mbstrdecoder \\
        pathvalidate tabledata tcolorpy typepy chardet portalocker tabulate colorama lxml joblib \\
        threadpoolctl nltk
    PYTHONPATH=/tmp/lmtarget OMP_NUM_THREADS=1 .venv/bin/python bench/lm_eval_check.py

(`pip install "lm-eval[hf,api]==0.4.13"` into the venv does the same with dependency
resolution - a dry run on 2026-12-03 only added packages, changing none installed; the
--target line above adds what the dev venv lacks without touching it.)
"""
from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "serve")]  # the grammar model, the test server

# float32 on both sides, different kernels (transformers' Llama vs Bastion's engine; a batch of
# 8 padded in hf, one prompt per forward in the server): per token the log-softmax differs by
# a few float32 ulps of the logits, summed over a continuation of at most ~8 tokens. Measured
# worst case 2.3e-6 nats (2026-12-03); 1e-4 is 40x that, and the smallest gap between a
# document's two choices is 0.02 nats (200x the bound).
LL_TOLERANCE = 1e-4
N_DOCS = 40
MAX_LENGTH = 128  # the model's context (model.max_seq_len)


def _agreement_docs(n: int, seed: int) -> list[dict[str, Any]]:
    """Grammar documents cut before a sentence's verb: the context, the two forms of the verb
    with the rest of the sentence (label 0 agrees with the subject), and the verbs that agree."""
    from synthetic.corpus import VERBS, grammar_documents

    plural_of = VERBS  # singular -> plural form
    singular_of = {p: s for s, p in VERBS.items()}
    rng = random.Random(seed)
    out = []
    for k, doc in enumerate(grammar_documents(n, seed=seed)):
        sentences = [s.strip() + "." for s in doc.split(".") if s.strip()]
        i = k % len(sentences)  # every 4th: the document's last sentence (its end of text comes next)
        words = sentences[i].split()
        v = next(j for j, w in enumerate(words) if w in plural_of or w in singular_of)
        # The continuation: the verb alone, the verb and "the", or the rest of the sentence
        # (short ones are often the model's greedy choice: is_greedy is compared both ways).
        verb, rest = words[v], "".join(" " + w for w in words[v + 1:][:[0, 1, None, None][i % 4]])
        other = plural_of.get(verb) or singular_of[verb]
        context = " ".join(sentences[:i] + [" ".join(words[:v])])
        agreeing = list(VERBS) if verb in plural_of else list(VERBS.values())
        choices = [f" {verb}{rest}", f" {other}{rest}"]
        label = rng.randrange(2)
        if label:
            choices.reverse()
        out.append({"context": context, "choices": choices, "label": label, "agreeing": agreeing})
    return out


def write_tasks(folder: Path, n: int = N_DOCS, seed: int = 11) -> Path:
    """The two local tasks (YAML) over one JSONL file, in `folder`; returns the include path."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "agreement.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in _agreement_docs(n, seed)))
    common = (f"dataset_path: json\n"
              f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'datasets-cache'}\n"
              f"test_split: test\n"
              f"doc_to_text: \"{{{{context}}}}\"\n")
    (folder / "bastion_agreement.yaml").write_text(
        "task: bastion_agreement\n" + common +
        "output_type: multiple_choice\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "target_delimiter: \"\"\n"  # the choices start with their space
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n")
    (folder / "bastion_agreement_gen.yaml").write_text(
        "task: bastion_agreement_gen\n" + common +
        "output_type: generate_until\n"
        "doc_to_target: agreeing\n"  # a list: a sample scores 1 if any verb that agrees matches
        "generation_kwargs:\n"
        "  until: [\" the\", \".\"]\n"
        "  max_gen_toks: 8\n"
        "  do_sample: false\n"
        "  temperature: 0\n"
        "filter_list:\n"
        "  - name: strip\n"
        "    filter:\n"
        "      - function: remove_whitespace\n"
        "      - function: take_first\n"
        "metric_list:\n"
        "  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n")
    return folder


def _evaluate(model: str, model_args: dict[str, Any], tasks: list[str], include: Path, **kw: Any) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                   task_manager=TaskManager(include_path=str(include), include_defaults=False),
                                   bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0, **kw)


def _by_doc(result: dict, task: str) -> dict[int, dict]:
    return {s["doc_id"]: s for s in result["samples"][task]}


def _metric(result: dict, task: str, name: str) -> float:
    return result["results"][task][f"{name},{'strip' if task.endswith('_gen') else 'none'}"]


def compare_loglikelihood(ref: dict, got: dict, task: str = "bastion_agreement") -> dict[str, Any]:
    """Per choice: |loglikelihood difference| and is_greedy agreement; per sample acc/acc_norm."""
    a, b = _by_doc(ref, task), _by_doc(got, task)
    assert a.keys() == b.keys(), "different documents"
    worst, greedy_same, n, metric_same = 0.0, 0, 0, 0
    for doc_id, s in a.items():
        for (ll_a, g_a), (ll_b, g_b) in zip(s["filtered_resps"], b[doc_id]["filtered_resps"], strict=True):
            worst = max(worst, abs(float(ll_a) - float(ll_b)))
            greedy_same += bool(g_a) == bool(g_b)
            n += 1
        metric_same += s["acc"] == b[doc_id]["acc"] and s["acc_norm"] == b[doc_id]["acc_norm"]
    return {"choices": n, "max_abs_ll_diff": worst, "is_greedy_equal": greedy_same, "samples": len(a),
            "metrics_equal": metric_same, "greedy": sum(bool(g) for s in b.values() for _, g in s["filtered_resps"]),
            "acc": (_metric(ref, task, "acc"), _metric(got, task, "acc")),
            "acc_norm": (_metric(ref, task, "acc_norm"), _metric(got, task, "acc_norm"))}


def compare_generations(ref: dict, got: dict, task: str = "bastion_agreement_gen") -> dict[str, Any]:
    a, b = _by_doc(ref, task), _by_doc(got, task)
    assert a.keys() == b.keys(), "different documents"
    same = sum(a[i]["resps"] == b[i]["resps"] for i in a)
    metric_same = sum(a[i]["exact_match"] == b[i]["exact_match"] for i in a)
    differ = [(a[i]["resps"], b[i]["resps"]) for i in a if a[i]["resps"] != b[i]["resps"]][:3]
    return {"samples": len(a), "text_equal": same, "metrics_equal": metric_same, "first_differences": differ,
            "exact_match": (_metric(ref, task, "exact_match"), _metric(got, task, "exact_match")),
            "nonempty": sum(bool(b[i]["resps"][0][0]) for i in b)}


def bos_checkpoint(work: Path) -> tuple[Path, Path]:
    """A model whose tokenizer puts BOS before every text (as Llama's and Mistral's do): a
    random 1-layer Llama with a BPE tokenizer trained on the grammar, imported with `bastion
    import hf` and exported again. Returns (checkpoint, export folder)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from bastion.interop.hf import export_hf, import_hf
    from synthetic.corpus import grammar_documents

    torch.manual_seed(0)
    src = work / "bos-src"
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                                      max_position_embeddings=MAX_LENGTH)
    transformers.LlamaForCausalLM(config).save_pretrained(src)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(grammar_documents(300, seed=0), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    ckpt = import_hf(src, work / "bos-ckpt")
    return ckpt, export_hf(ckpt, work / "bos-hf")


def run_bos_comparison(work: Path, include: Path) -> dict[str, Any]:
    """The multiple-choice task on a BOS-adding tokenizer: lm-eval's hf model (BOS first, as
    the tokenizer does) vs local-completions with token ids and add_bos_token=True (the
    setting docs/serving.md asks for), without it, and with text prompts."""
    from serving import running

    ckpt, hf_dir = bos_checkpoint(work)
    task = ["bastion_agreement"]
    hf = _evaluate("hf", {"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu", "max_length": MAX_LENGTH},
                   task, include, batch_size=8)
    out = {}
    with running(ckpt, serve={"max_prompts": 8, "rate_limit": {"requests_per_minute": None,
                                                                "tokens_per_minute": None}}) as (url, state):
        api = {"model": state.model_name, "tokenizer": str(hf_dir), "tokenizer_backend": "huggingface",
               "max_length": MAX_LENGTH, "max_retries": 1, "base_url": f"{url}/v1/completions", "batch_size": 8}
        for name, extra in (("bos: token ids, add_bos_token=True", {"add_bos_token": True}),
                            ("bos: token ids, no add_bos_token", {}),
                            ("bos: text prompts", {"tokenized_requests": False})):
            out[name] = {"loglikelihood": compare_loglikelihood(hf, _evaluate("local-completions", {**api, **extra},
                                                                              task, include))}
    return out


def run_comparison(work: Path) -> dict[str, Any]:
    """Train, export, serve and evaluate; returns the comparisons (no assertion here)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    from bastion.interop.hf import export_hf
    from serving import API_KEY, running
    from synthetic.grammar_model import train_grammar_checkpoint

    torch.set_num_threads(1)
    ckpt = train_grammar_checkpoint(work / "run")
    hf_dir = export_hf(ckpt, work / "hf")
    include = write_tasks(work / "tasks")
    both = ["bastion_agreement", "bastion_agreement_gen"]
    out: dict[str, Any] = {}
    hf = _evaluate("hf", {"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu", "max_length": MAX_LENGTH},
                   both, include, batch_size=8)
    hf_chat = _evaluate("hf", {"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu",
                               "max_length": MAX_LENGTH}, ["bastion_agreement_gen"], include, batch_size=8,
                        apply_chat_template=True)
    old_key = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = API_KEY  # what local-completions sends as `Authorization: Bearer`
    try:
        # An evaluation is a burst of requests: lm-eval retries a 429 only max_retries times.
        limits = {"max_prompts": 8, "rate_limit": {"requests_per_minute": None, "tokens_per_minute": None}}
        with running(ckpt, serve=limits, generate={"max_new_tokens_ceiling": 64},
                     environ={"BASTION_API_KEYS": API_KEY}) as (url, state):
            assert state.require_keys
            api = {"model": state.model_name, "tokenizer": str(hf_dir), "tokenizer_backend": "huggingface",
                   "max_length": MAX_LENGTH, "max_retries": 1}
            served = _evaluate("local-completions", {**api, "base_url": f"{url}/v1/completions",
                                                     "tokenized_requests": True, "num_concurrent": 4,
                                                     "batch_size": 8}, both, include)
            served_text = _evaluate("local-completions", {**api, "base_url": f"{url}/v1/completions",
                                                          "tokenized_requests": False, "batch_size": 8},
                                    both, include)
            chat = _evaluate("local-chat-completions", {"model": state.model_name, "max_retries": 1,
                                                        "base_url": f"{url}/v1/chat/completions"},
                             ["bastion_agreement_gen"], include, apply_chat_template=True)
    finally:
        if old_key is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = old_key
    out["completions"] = {"loglikelihood": compare_loglikelihood(hf, served),
                          "generate_until": compare_generations(hf, served)}
    out["completions-text"] = {"loglikelihood": compare_loglikelihood(hf, served_text),
                               "generate_until": compare_generations(hf, served_text)}
    out["chat"] = {"generate_until": compare_generations(hf_chat, chat)}
    out.update(run_bos_comparison(work, include))
    return out


# Routes that must NOT match hf: scored one token off (docs/serving.md says why).
MISMATCHED = ("bos: token ids, no add_bos_token", "bos: text prompts")


def failures(report: dict[str, Any]) -> list[str]:
    """What disagrees, in words (empty: everything the check asserts holds)."""
    bad = []
    for route, parts in report.items():
        ll = parts.get("loglikelihood")
        if route in MISMATCHED:
            if ll["max_abs_ll_diff"] < 0.01:
                bad.append(f"{route}: expected to score other tokens than hf, but within {ll['max_abs_ll_diff']:.2e}")
            continue
        if ll is not None:
            if ll["max_abs_ll_diff"] > LL_TOLERANCE:
                bad.append(f"{route}: loglikelihood {ll['max_abs_ll_diff']:.2e} nats from hf (> {LL_TOLERANCE})")
            for key, total in (("is_greedy_equal", "choices"), ("metrics_equal", "samples")):
                if ll[key] != ll[total]:
                    bad.append(f"{route}: {key} {ll[key]}/{ll[total]}")
            for name in ("acc", "acc_norm"):
                if ll[name][0] != ll[name][1]:
                    bad.append(f"{route}: {name} hf {ll[name][0]} vs {ll[name][1]}")
        gen = parts.get("generate_until")
        if gen is None:
            continue
        for key in ("text_equal", "metrics_equal"):
            if gen[key] != gen["samples"]:
                bad.append(f"{route}: generate_until {key} {gen[key]}/{gen['samples']} "
                           f"(first differences {gen['first_differences']})")
        if gen["exact_match"][0] != gen["exact_match"][1]:
            bad.append(f"{route}: exact_match hf {gen['exact_match'][0]} vs {gen['exact_match'][1]}")
    return bad


def summary(report: dict[str, Any]) -> str:
    lines = []
    for route, parts in report.items():
        ll = parts.get("loglikelihood")
        if ll is not None:
            lines.append(f"{route:17s} loglikelihood: {ll['choices']} choices, max |lm-eval hf - served| = "
                         f"{ll['max_abs_ll_diff']:.2e} nats, is_greedy equal {ll['is_greedy_equal']}/{ll['choices']} "
                         f"({ll['greedy']} greedy), acc {ll['acc'][0]:.4f} / {ll['acc'][1]:.4f}, acc_norm "
                         f"{ll['acc_norm'][0]:.4f} / {ll['acc_norm'][1]:.4f} (hf / served), per-sample metrics "
                         f"equal {ll['metrics_equal']}/{ll['samples']}")
        gen = parts.get("generate_until")
        if gen is None:
            continue
        lines.append(f"{route:17s} generate_until: {gen['text_equal']}/{gen['samples']} generations equal "
                     f"({gen['nonempty']} non-empty), exact_match {gen['exact_match'][0]:.4f} / "
                     f"{gen['exact_match'][1]:.4f} (hf / served), per-sample equal {gen['metrics_equal']}/{gen['samples']}")
    return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = run_comparison(Path(tmp))
    print(summary(report))
    bad = failures(report)
    if bad:
        sys.exit("lm-eval's hf model and bastion serve disagree:\n" + "\n".join(bad))


if __name__ == "__main__":
    main()
