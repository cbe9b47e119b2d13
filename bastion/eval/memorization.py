"""Memorization audit with canaries: exposure, as in Carlini et al., "The Secret Sharer" (2019).

For a canary "my PIN is {secret}" with secrets drawn from R = all 10^digits digit strings:

    exposure = log2 |R| - log2 rank

where rank (1 = most likely) is the true secret's position among all candidates ordered by the
model's likelihood of the canary text. A secret the model has not learnt sits mid-pack
(exposure around 1); one it reproduces ranks first (exposure log2 |R|, the maximum).

The score of a candidate is the log-likelihood of the whole canary text after an eos token
(every canary document follows one in the training stream): the paper's log-perplexity. The
prefix's tokens score the same for every candidate, so the order is that of the secret given
the prefix; scoring whole texts also stays right when the tokenizer merges the prefix's last
space into the digits (byte-level BPE does: " 482913").

|R| <= exact_limit: every candidate is scored and the rank is exact. Above that, the rank is
estimated from a uniform sample of m other candidates: rank ~ 1 + (|R| - 1) * h / m, with h
the number of sampled candidates scoring higher. If none does, the sample cannot resolve the
rank any better than 1 + (|R| - 1) / m, and the exposure is reported as "at least" that
(`beyond_resolution`); raise the sample size for more.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bastion.data.canaries import Canary, candidate, read_canaries
from bastion.errors import DataError

Scorer = Callable[[Sequence[str]], np.ndarray]  # secrets -> log-likelihoods (higher = more likely)
DEFAULT_EXACT_LIMIT = 10_000
DEFAULT_SAMPLE_SIZE = 10_000
SCORE_CHUNK = 4096  # candidates handed to the scorer at a time (bounds host memory)


def exposure(rank: float, candidate_space: int) -> float:
    """log2 |R| - log2 rank; rank 1 gives the maximum, log2 |R|."""
    if not 1 <= rank <= candidate_space:
        raise ValueError(f"rank {rank} outside [1, {candidate_space}]")
    return math.log2(candidate_space) - math.log2(rank)


@dataclass
class RankResult:
    rank: float  # exact, or the estimate (the resolution limit when beyond_resolution)
    exact: bool
    sample_size: int | None  # other candidates scored, when estimated
    exposure: float
    max_exposure: float
    beyond_resolution: bool = False  # estimated, and no sampled candidate beat the secret


def rank_secret(score: Scorer, secret: str, digits: int, *, exact_limit: int = DEFAULT_EXACT_LIMIT,
                sample_size: int = DEFAULT_SAMPLE_SIZE, rng: np.random.Generator | None = None) -> RankResult:
    """Rank of `secret` among all `digits`-digit strings under `score` (exact or sampled)."""
    space = 10**digits
    if len(secret) != digits or not secret.isdigit():
        raise ValueError(f"secret must be {digits} digits")
    max_exposure = math.log2(space)
    if space <= exact_limit:
        chunks = (range(s, min(s + SCORE_CHUNK, space)) for s in range(0, space, SCORE_CHUNK))
        scores = np.concatenate([np.asarray(score([candidate(i, digits) for i in chunk])) for chunk in chunks])
        rank = 1 + int(np.count_nonzero(scores > scores[int(secret)]))
        return RankResult(rank, True, None, exposure(rank, space), max_exposure)

    rng = rng if rng is not None else np.random.default_rng()
    # Uniform over R without the secret: draw from |R| - 1 values and skip over the secret's index.
    picks = rng.integers(0, space - 1, size=sample_size)
    picks = picks + (picks >= int(secret))
    own = float(np.asarray(score([secret]))[0])
    higher = 0
    for s in range(0, sample_size, SCORE_CHUNK):
        chunk = [candidate(int(i), digits) for i in picks[s:s + SCORE_CHUNK]]
        higher += int(np.count_nonzero(np.asarray(score(chunk)) > own))
    beyond = higher == 0
    rank = 1 + (space - 1) * max(higher, 1) / sample_size
    return RankResult(rank, False, sample_size, exposure(rank, space), max_exposure, beyond)


class ModelScorer:
    """Scores candidate secrets of one canary format with a causal LM (see module docstring)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, canary: Canary, *, batch_size: int = 256):
        self.model, self.tokenizer, self.canary, self.batch_size = model, tokenizer, canary, batch_size
        self.device = next(model.parameters()).device
        self.max_len = model.cfg.max_seq_len

    def _encode(self, texts: list[str]) -> list[list[int]]:
        ids = [[self.tokenizer.eos_id, *t] for t in self.tokenizer.encode_batch(texts)]
        longest = max(len(i) for i in ids)
        if longest > self.max_len:
            raise DataError(f"canary {self.canary.id} is {longest} tokens long, over the model's context "
                            f"({self.max_len})")
        return ids

    @torch.inference_mode()
    def __call__(self, secrets: Sequence[str]) -> np.ndarray:
        out = np.empty(len(secrets), dtype=np.float64)
        for start in range(0, len(secrets), self.batch_size):
            seqs = self._encode([self.canary.render(s) for s in secrets[start:start + self.batch_size]])
            width = max(len(s) for s in seqs)
            # Right padding: a causal model's scores for real positions ignore what follows them.
            tokens = torch.full((len(seqs), width), self.tokenizer.eos_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
            for row, seq in enumerate(seqs):
                tokens[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq) - 1] = True
            tokens, mask = tokens.to(self.device), mask.to(self.device)
            logits, _ = self.model(tokens[:, :-1])
            logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
            out[start:start + len(seqs)] = (logp * mask).sum(1).double().cpu().numpy()
        return out

    @torch.inference_mode()
    def greedy_hit(self) -> bool:
        """Does greedy decoding after the prefix spell out the secret? Compared as text: the model
        may take another token path to the same digits ("10" "33" or "1" "0" "33")."""
        full = self.tokenizer.encode(self.canary.prefix + self.canary.secret)
        prefix = self.tokenizer.encode(self.canary.prefix)
        k = 0  # tokens shared with the prefix alone (a trailing space may merge into the digits)
        while k < min(len(full), len(prefix)) and full[k] == prefix[k]:
            k += 1
        context, target = [self.tokenizer.eos_id, *full[:k]], self.tokenizer.decode(full[k:])
        budget = len(full) - k + self.canary.digits  # enough tokens to spell the secret any way
        if len(context) + budget > self.max_len:
            raise DataError(f"canary {self.canary.id} does not fit the model's context ({self.max_len})")
        tokens = torch.tensor([context], device=self.device)
        text = ""
        for _ in range(budget):
            logits, _ = self.model(tokens)
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            text = self.tokenizer.decode(tokens[0, len(context):].tolist())
            if len(text) >= len(target):
                break
        return text.startswith(target)


@dataclass
class CanaryResult:
    id: str
    repeats: int
    digits: int
    candidate_space: int
    rank: float
    rank_exact: bool
    sample_size: int | None
    exposure: float
    max_exposure: float
    beyond_resolution: bool
    greedy_hit: bool


@dataclass
class MemorizationReport:
    checkpoint: str
    canaries_file: str
    results: list[CanaryResult] = field(default_factory=list)

    def by_repeats(self) -> dict[int, float]:
        """Mean exposure per repetition count."""
        groups: dict[int, list[float]] = {}
        for r in self.results:
            groups.setdefault(r.repeats, []).append(r.exposure)
        return {k: sum(v) / len(v) for k, v in sorted(groups.items())}

    def to_dict(self) -> dict[str, Any]:
        # The secrets stay out of reports: they may be shared, the records file may not.
        return {"checkpoint": self.checkpoint, "canaries_file": self.canaries_file,
                "results": [asdict(r) for r in self.results],
                "mean_exposure_by_repeats": {str(k): v for k, v in self.by_repeats().items()}}


def audit_memorization(checkpoint: str | Path, canaries_file: str | Path, *,
                       sample_size: int = DEFAULT_SAMPLE_SIZE, exact_limit: int = DEFAULT_EXACT_LIMIT,
                       seed: int = 0, device: str | torch.device = "cpu", batch_size: int = 256) -> MemorizationReport:
    """Load a checkpoint (verified) and measure the exposure of every canary in the records file."""
    from bastion.infer.loading import load_for_inference

    if sample_size < 1 or exact_limit < 1:
        raise ValueError("sample_size and exact_limit must be >= 1")
    canaries, dataset = read_canaries(canaries_file)
    loaded = load_for_inference(checkpoint, verify=True, device=device)
    expected = dataset.get("tokenizer_sha256")
    actual = hashlib.sha256((loaded.directory / "tokenizer.json").read_bytes()).hexdigest()
    if expected is not None and expected != actual:
        raise DataError(f"{loaded.directory} uses a different tokenizer than the dataset the canaries were made for; "
                        "the scores would be meaningless")
    report = MemorizationReport(str(loaded.directory), str(canaries_file))
    for i, canary in enumerate(canaries):
        scorer = ModelScorer(loaded.model, loaded.tokenizer, canary, batch_size=batch_size)
        ranked = rank_secret(scorer, canary.secret, canary.digits, exact_limit=exact_limit, sample_size=sample_size,
                             rng=np.random.default_rng([seed, i]))
        report.results.append(CanaryResult(
            canary.id, canary.repeats, canary.digits, canary.candidate_space, ranked.rank, ranked.exact,
            ranked.sample_size, ranked.exposure, ranked.max_exposure, ranked.beyond_resolution, scorer.greedy_hit()))
    return report
