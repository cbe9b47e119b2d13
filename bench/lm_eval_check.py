"""lm-eval's `local-completions` model against `bastion serve`: loglikelihood (token-id
prompts, echo, logprobs) and generate_until, checked against the model's own numbers.

Builds a small model trained for 200 steps on the synthetic agreement grammar
(tests/synthetic/grammar_model.py), exports its tokenizer with `bastion export hf` (lm-eval
tokenizes with a Hugging Face tokenizer), serves it on 127.0.0.1 in this process, and runs
lm-eval's own LocalCompletionsAPI (lm_eval 0.4.13) on 24 (context, continuation) pairs, plus
up to 8 whose continuation is the model's own greedy one:
lm-eval's loglikelihood and is_greedy must equal a plain forward of the Bastion model, and
its greedy generations Bastion's `generate()`. Not part of `make test` (lm_eval is not a
dependency); run it with lm_eval on the path:

    .venv/bin/pip install --no-deps --target /tmp/lmtarget lm_eval==0.4.13
    .venv/bin/pip install --target /tmp/lmtarget aiohttp tenacity sqlitedict
    PYTHONPATH=/tmp/lmtarget OMP_NUM_THREADS=1 .venv/bin/python bench/lm_eval_check.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "serve")]  # the grammar model, the test server


def main() -> None:
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from bastion.config.schema import GenerateConfig
    from bastion.infer import generate
    from bastion.infer.loading import load_for_inference
    from bastion.interop.hf import export_hf
    from serving import running
    from synthetic.corpus import grammar_documents
    from synthetic.grammar_model import train_grammar_checkpoint

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = train_grammar_checkpoint(work / "run")
        hf_dir = export_hf(ckpt, work / "hf")
        loaded = load_for_inference(ckpt)
        docs = grammar_documents(24, seed=7)
        pairs = [(" ".join(d.split()[:3]), " " + " ".join(d.split()[3:6])) for d in docs]
        # And 8 whose continuation is the model's own greedy one (is_greedy must say True).
        greedy_limits = GenerateConfig(max_new_tokens=3, max_new_tokens_ceiling=64, temperature=0.0)
        for context, _ in pairs[:8]:
            own = generate(loaded.model, loaded.tokenizer, context, limits=greedy_limits).text
            if own and loaded.tokenizer.encode(context + own)[:len(loaded.tokenizer.encode(context))] == \
                    loaded.tokenizer.encode(context):  # tokenizes with the context's tokens first
                pairs.append((context, own))
        with running(ckpt, serve={"max_prompts": 8}, generate={"max_new_tokens_ceiling": 64}) as (url, state):
            lm = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model=state.model_name, tokenizer=str(hf_dir),
                                     tokenizer_backend="huggingface", tokenized_requests=True, batch_size=8,
                                     max_retries=1, max_length=128)
            got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)],
                                   disable_tqdm=True)
            until = [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 8, "temperature": 0}), i)
                     for i, (c, _) in enumerate(pairs[:8])]
            generated = lm.generate_until(until, disable_tqdm=True)
        worst, greedy_equal = 0.0, 0
        for (context, continuation), (ll, is_greedy) in zip(pairs, got):
            ctx = loaded.tokenizer.encode(context)
            whole = loaded.tokenizer.encode(context + continuation)
            with torch.no_grad():
                logp = torch.log_softmax(loaded.model(torch.tensor([whole]))[0][0].float(), dim=-1)
            want = sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
            greedy = all(logp[i - 1].argmax().item() == whole[i] for i in range(len(ctx), len(whole)))
            worst = max(worst, abs(ll - want))
            greedy_equal += greedy == is_greedy
        limits = GenerateConfig(max_new_tokens=8, max_new_tokens_ceiling=64, temperature=0.0)
        same_text = sum(generate(loaded.model, loaded.tokenizer, c, limits=limits, stop=["\n"]).text == text
                        for (c, _), text in zip(pairs[:8], generated))
    mean = sum(ll for ll, _ in got) / len(got)
    print(f"loglikelihood: {len(pairs)} pairs (mean {mean:.3f} nats, {sum(g for _, g in got)} greedy), largest "
          f"|lm-eval - Bastion forward| = {worst:.2e} nats; is_greedy equal {greedy_equal}/{len(pairs)}")
    print(f"generate_until: {same_text}/8 generations equal to Bastion's generate()")
    if worst > 1e-3 or greedy_equal != len(pairs) or same_text != 8:
        sys.exit("lm-eval and Bastion disagree")


if __name__ == "__main__":
    main()
