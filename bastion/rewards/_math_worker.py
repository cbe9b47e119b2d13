"""The `math` reward's worker process: reads {"gold", "pred"} JSON lines on stdin, answers
"1" or "0" per line on stdout.

math-verify (sympy underneath) can run for ever on a short hostile answer (`9^{9^{9^{9}}}`
evaluates the power; 500 nested braces hang the LaTeX parser), and its own timeouts use
signal.alarm, which only works in the main thread. So the parent runs the comparison here,
in a process it kills when an answer takes longer than its timeout. This file imports only
the standard library and math-verify (the parent starts it with `python -I`), and caps its
own address space so a hostile answer fails with MemoryError instead of eating the host.
"""
from __future__ import annotations

import json
import logging
import resource
import sys
from functools import lru_cache

MEMORY_LIMIT_BYTES = 4 << 30


def _limit_memory() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = MEMORY_LIMIT_BYTES if hard == resource.RLIM_INFINITY else min(MEMORY_LIMIT_BYTES, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def main() -> None:
    _limit_memory()
    logging.disable(logging.WARNING)  # math-verify warns once that its timeouts are off: we time it from outside
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    pred_config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    @lru_cache(maxsize=1024)
    def parse_gold(gold: str) -> list:
        # A bare "0.5" or "\frac{1}{2}" is read as math; a gold already in $...$ or \boxed{} as is.
        text = gold if ("$" in gold or "\\boxed" in gold) else f"${gold}$"
        return parse(text, parsing_timeout=None)

    def matches(gold: str, pred: str) -> bool:
        parsed_gold = parse_gold(gold)
        if not parsed_gold:  # not math ("Paris"): the answer must be the same text
            return pred.strip() == gold.strip()
        return bool(verify(parsed_gold, parse(pred, extraction_config=pred_config, parsing_timeout=None),
                           timeout_seconds=None))

    # The first comparison pays for sympy's and the LaTeX grammar's lazy set-up (seconds on a
    # loaded machine): done here, before "ready", it cannot run into the first real answer's
    # timeout and score a correct answer 0.
    matches("\\frac{1}{2}", "$0.5$")
    parse_gold.cache_clear()
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            ok = matches(request["gold"], request["pred"])
        except Exception:  # MemoryError, RecursionError, sympy's own: not equivalent  # noqa: BLE001
            ok = False
        print("1" if ok else "0", flush=True)


if __name__ == "__main__":
    main()
