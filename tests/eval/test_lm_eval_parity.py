"""lm-eval (0.4.13) scores a model the same through `bastion serve` as through its `bastion
export hf` folder: local-completions (token ids and text), local-chat-completions and the hf
model on the same local tasks, sample by sample, and for a BOS-adding tokenizer
local-completions with add_bos_token=True (bench/lm_eval_check.py). Slow (~1.5 min on
one thread) and needs lm_eval, which is not a dependency: `pytest -m slow` with lm_eval
installed (the command is at the top of bench/lm_eval_check.py); skipped without it."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import lm_eval_check  # noqa: E402  (imports nothing heavy until run)


@pytest.mark.slow
def test_lm_eval_scores_the_served_model_as_the_exported_one(tmp_path):
    for module in ("lm_eval", "aiohttp", "tenacity"):  # the last two: lm-eval[api], for its API models
        pytest.importorskip(module, reason=f"{module} is not installed (lm-eval is not a Bastion dependency; "
                                           "see bench/lm_eval_check.py)")
    report = lm_eval_check.run_comparison(tmp_path)
    assert lm_eval_check.failures(report) == [], lm_eval_check.summary(report)
    completions = report["completions"]["loglikelihood"]
    # Not vacuous: both kinds of is_greedy, a generation task with hits and misses, chat text.
    assert completions["choices"] == 80 and 0 < completions["greedy"] < 80
    assert 0 < report["completions"]["generate_until"]["exact_match"][0] < 1
    assert report["chat"]["generate_until"]["nonempty"] > 0
