"""Per-key token buckets: requests per minute and tokens per minute.

Each key id has up to two buckets, each holding at most its per-minute limit and refilled
continuously at limit/60 per second, so a key can burst its whole minute's allowance and then
proceeds at the steady rate. A request takes 1 from the request bucket and `tokens`
(prompt + max completion tokens) from the token bucket, both or neither; unused completion
tokens are given back with `refund` when the request ends.

    limiter = RateLimiter(cfg.serve.rate_limit)
    try:
        wait = limiter.check(key_id, prompt_tokens + max_tokens)
    except RequestTooLarge as exc:        # can never fit: 400, str(exc) is the message
        ...
    if wait is not None:                   # 429 with Retry-After: retry_after_seconds(wait)
        ...

Memory is bounded: a full bucket is the same as no bucket, so full buckets are dropped as they
are found, and at most `max_keys` keys are tracked (least recently used evicted first).
"""
from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from bastion.config.schema import RateLimitConfig
from bastion.errors import GenerationLimitError

DEFAULT_MAX_KEYS = 100_000
_EPS = 1e-9  # float slack: waiting exactly the returned time must be enough


class RequestTooLarge(GenerationLimitError):
    """A request needs more tokens than the per-minute limit: it can never be allowed (400)."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"request needs {tokens} tokens, over the per-minute limit {limit}")
        self.tokens = tokens
        self.limit = limit


def retry_after_seconds(wait: float) -> int:
    """A wait from `RateLimiter.check` as a Retry-After header value: whole seconds, >= 1."""
    return max(1, math.ceil(wait - _EPS))


class _Bucket:
    __slots__ = ("requests", "tokens", "updated")

    def __init__(self, requests: float, tokens: float, updated: float) -> None:
        self.requests = requests
        self.tokens = tokens
        self.updated = updated


class RateLimiter:
    """Thread-safe per-key limits from a `RateLimitConfig` (a None limit = unlimited)."""

    def __init__(self, cfg: RateLimitConfig, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.requests_per_minute = cfg.requests_per_minute
        self.tokens_per_minute = cfg.tokens_per_minute
        self._clock = clock
        self._max_keys = max_keys
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently used first
        self._req_cap = float(cfg.requests_per_minute) if cfg.requests_per_minute is not None else math.inf
        self._tok_cap = float(cfg.tokens_per_minute) if cfg.tokens_per_minute is not None else math.inf
        self._req_rate = self._req_cap / 60.0  # per second (inf when unlimited; never used then)
        self._tok_rate = self._tok_cap / 60.0

    @property
    def unlimited(self) -> bool:
        return self.requests_per_minute is None and self.tokens_per_minute is None

    def __len__(self) -> int:
        """Number of keys currently tracked (keys with full buckets need not be)."""
        return len(self._buckets)

    def check(self, key_id: str, tokens: int) -> float | None:
        """Admit a request for `key_id` needing `tokens` tokens: None when allowed (1 request
        and `tokens` tokens are then taken), else the seconds until it would be allowed.
        Raises RequestTooLarge when `tokens` exceeds the per-minute token limit."""
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        if self.tokens_per_minute is not None and tokens > self.tokens_per_minute:
            raise RequestTooLarge(tokens, self.tokens_per_minute)
        if self.unlimited:
            return None
        with self._lock:
            now = self._clock()
            bucket = self._refilled(key_id, now)
            wait = 0.0
            if self.requests_per_minute is not None and bucket.requests < 1.0 - _EPS:
                wait = (1.0 - bucket.requests) / self._req_rate
            if self.tokens_per_minute is not None and bucket.tokens < tokens - _EPS:
                wait = max(wait, (tokens - bucket.tokens) / self._tok_rate)
            if wait > 0.0:
                self._store(key_id, bucket)
                return wait
            if self.requests_per_minute is not None:
                bucket.requests = max(0.0, bucket.requests - 1.0)
            if self.tokens_per_minute is not None:
                bucket.tokens = max(0.0, bucket.tokens - tokens)
            self._store(key_id, bucket)
            return None

    def refund(self, key_id: str, tokens: int) -> None:
        """Give back tokens a request reserved but did not use (capped at the bucket size)."""
        if tokens <= 0 or self.tokens_per_minute is None:
            return
        with self._lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                return  # not tracked = full
            now = self._clock()
            self._refill(bucket, now)
            bucket.tokens = min(self._tok_cap, bucket.tokens + tokens)
            if self._full(bucket):
                del self._buckets[key_id]

    def available(self, key_id: str) -> tuple[float, float]:
        """(requests, tokens) currently available to `key_id` (inf for an unlimited kind)."""
        with self._lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                return self._req_cap, self._tok_cap
            probe = _Bucket(bucket.requests, bucket.tokens, bucket.updated)
            self._refill(probe, self._clock())
            return (probe.requests if self.requests_per_minute is not None else math.inf,
                    probe.tokens if self.tokens_per_minute is not None else math.inf)

    # -- internals (called with the lock held) --

    def _refill(self, bucket: _Bucket, now: float) -> None:
        elapsed = now - bucket.updated
        if elapsed > 0:
            if self.requests_per_minute is not None:
                bucket.requests = min(self._req_cap, bucket.requests + elapsed * self._req_rate)
            if self.tokens_per_minute is not None:
                bucket.tokens = min(self._tok_cap, bucket.tokens + elapsed * self._tok_rate)
        bucket.updated = max(bucket.updated, now)  # a clock going backwards refills nothing

    def _full(self, bucket: _Bucket) -> bool:
        return ((self.requests_per_minute is None or bucket.requests >= self._req_cap)
                and (self.tokens_per_minute is None or bucket.tokens >= self._tok_cap))

    def _refilled(self, key_id: str, now: float) -> _Bucket:
        bucket = self._buckets.get(key_id)
        if bucket is None:
            return _Bucket(self._req_cap, self._tok_cap, now)
        self._refill(bucket, now)
        return bucket

    def _store(self, key_id: str, bucket: _Bucket) -> None:
        now = bucket.updated
        if self._full(bucket):
            self._buckets.pop(key_id, None)
        else:
            self._buckets[key_id] = bucket
            self._buckets.move_to_end(key_id)
        # Amortised clean-up: drop the least recently used bucket if it has refilled.
        if self._buckets:
            oldest_id, oldest = next(iter(self._buckets.items()))
            if oldest_id != key_id:
                self._refill(oldest, now)
                if self._full(oldest):
                    del self._buckets[oldest_id]
        # Hard bound: evict least recently used buckets even if not yet full.
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
