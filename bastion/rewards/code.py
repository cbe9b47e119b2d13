"""The `code_tests` reward: run the completion's Python against the record's tests in the
sandbox (bastion/rewards/sandbox.py) and score 1.0 when every test passes, else 0.0 (or the
fraction passed, with partial_credit).

    rewards:
      - name: code_tests
        timeout_seconds: 10
        partial_credit: true

The record's "tests" is a string of Python asserts (one test) or a list of such strings
(one test each; partial credit counts them). The code is the completion's last ```python
block, else its last fenced block, else the whole completion.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from bastion.errors import DataError
from bastion.rewards.registry import Reward, Sample, register_reward
from bastion.rewards.sandbox import SandboxLimits, SandboxResult, extract_code, normalize_tests, run_many


@register_reward
class CodeTestsReward(Reward):
    """Runs the completion's Python against the record's "tests" in a sandbox; 1.0 if all pass."""

    name = "code_tests"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        timeout_seconds: float = Field(10.0, ge=0.5, le=300)  # wall clock per completion
        cpu_seconds: int = Field(5, ge=1, le=300)
        memory_mb: int = Field(512, ge=64, le=16384)
        max_processes: int = Field(16, ge=1, le=256)
        max_output_bytes: int = Field(65536, ge=1024, le=16 << 20)
        partial_credit: bool = False  # score the fraction of tests passed instead of all-or-nothing
        max_workers: int = Field(default_factory=lambda: min(4, os.cpu_count() or 1), ge=1, le=32)
        allow_network_fallback: bool = False  # run with weaker isolation where namespaces are unavailable

    def __init__(self, params: BaseModel):
        super().__init__(params)
        p = self.params
        self.limits = SandboxLimits(timeout_seconds=p.timeout_seconds, cpu_seconds=p.cpu_seconds,
                                    memory_mb=p.memory_mb, max_processes=p.max_processes,
                                    max_output_bytes=p.max_output_bytes,
                                    allow_network_fallback=p.allow_network_fallback)

    def score(self, samples: Sequence[Sample]) -> list[float]:
        jobs = [(extract_code(s.completion), _tests_of(s, i)) for i, s in enumerate(samples)]
        return [self._value(r) for r in run_many(jobs, self.limits, self.params.max_workers)]

    def score_one(self, sample: Sample) -> float:
        return self.score([sample])[0]

    def _value(self, result: SandboxResult) -> float:
        if result.passed:
            return 1.0
        if self.params.partial_credit and result.status == "failed" and result.tests_total:
            return result.tests_passed / result.tests_total
        return 0.0  # timeouts, memory, killed runs and sandbox errors earn nothing


def _tests_of(sample: Sample, index: int) -> list[str]:
    if "tests" not in sample.record:
        raise DataError(f"code_tests: sample {index}: the record has no \"tests\" field "
                        "(a string of Python asserts or a list of them)")
    return normalize_tests(sample.record["tests"], f"code_tests: sample {index}: record field \"tests\"")
