"""Token-bucket rate limits with a fake clock."""
import math
import threading

import pytest

from bastion.config.schema import RateLimitConfig
from bastion.errors import GenerationLimitError
from bastion.serve.ratelimit import RateLimiter, RequestTooLarge, retry_after_seconds


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def limiter(rpm=60, tpm=6000, **kw):
    clock = Clock()
    return RateLimiter(RateLimitConfig(requests_per_minute=rpm, tokens_per_minute=tpm), clock=clock, **kw), clock


def test_request_burst_then_refill():
    rl, clock = limiter(rpm=3, tpm=None)
    assert [rl.check("a", 0) for _ in range(3)] == [None, None, None]
    wait = rl.check("a", 0)
    assert wait == pytest.approx(20.0)  # 3/min: one request every 20 s
    assert retry_after_seconds(wait) == 20
    assert rl.check("b", 0) is None  # keys are independent
    clock.t += 19.5
    assert rl.check("a", 0) == pytest.approx(0.5)
    assert retry_after_seconds(0.5) == 1
    clock.t += 0.5
    assert rl.check("a", 0) is None
    assert rl.check("a", 0) == pytest.approx(20.0)
    clock.t += 1000
    assert [rl.check("a", 0) for _ in range(4)] == [None, None, None, pytest.approx(20.0)]  # capped at 3


def test_waiting_exactly_retry_after_is_enough():
    rl, clock = limiter(rpm=7, tpm=1000)
    for _ in range(7):
        rl.check("a", 100)
    wait = rl.check("a", 100)
    assert wait is not None
    clock.t += wait
    assert rl.check("a", 100) is None


def test_token_bucket():
    rl, clock = limiter(rpm=None, tpm=600)  # 10 tokens per second
    assert rl.check("a", 500) is None
    assert rl.check("a", 200) == pytest.approx(10.0)  # 100 left, 100 more needed
    assert rl.available("a") == (math.inf, pytest.approx(100))
    clock.t += 5
    assert rl.check("a", 200) == pytest.approx(5.0)
    assert rl.check("a", 150) is None  # exactly 150 available
    assert rl.available("a")[1] == pytest.approx(0)


def test_refused_request_takes_nothing():
    rl, _ = limiter(rpm=2, tpm=100)
    assert rl.check("a", 90) is None
    assert rl.check("a", 50) == pytest.approx(24.0)  # token bucket short by 40 at 100/60 per s
    assert rl.available("a") == (pytest.approx(1.0), pytest.approx(10.0))  # no request taken either
    assert rl.check("a", 10) is None
    assert rl.check("a", 0) == pytest.approx(30.0)  # now the request bucket is the limit


def test_wait_is_max_of_both_buckets():
    rl, _ = limiter(rpm=1, tpm=60)
    assert rl.check("a", 60) is None
    assert rl.check("a", 30) == pytest.approx(60.0)  # requests: 60 s; tokens: 30 s


def test_too_large_request():
    rl, _ = limiter(rpm=10, tpm=1000)
    with pytest.raises(RequestTooLarge, match="request needs 1001 tokens, over the per-minute limit 1000") as info:
        rl.check("a", 1001)
    assert isinstance(info.value, GenerationLimitError)
    assert info.value.tokens == 1001 and info.value.limit == 1000
    assert rl.available("a") == (10, 1000)  # nothing taken
    assert rl.check("a", 1000) is None  # the full capacity in one request is fine
    with pytest.raises(ValueError):
        rl.check("a", -1)


def test_refund():
    rl, _ = limiter(rpm=None, tpm=1000)
    assert rl.check("a", 900) is None
    rl.refund("a", 700)  # the completion stopped early
    assert rl.available("a")[1] == pytest.approx(800)
    rl.refund("a", 10_000)
    assert rl.available("a")[1] == pytest.approx(1000)  # capped at capacity
    assert len(rl) == 0  # a full bucket is not tracked
    rl.refund("never-seen", 50)  # no-op
    rl.refund("a", 0)
    rl.refund("a", -5)
    assert rl.available("a")[1] == 1000


def test_unlimited():
    rl, _ = limiter(rpm=None, tpm=None)
    assert rl.unlimited
    assert all(rl.check("a", 10**9) is None for _ in range(1000))
    assert len(rl) == 0
    rl.refund("a", 5)


def test_one_kind_unlimited():
    rl, _ = limiter(rpm=None, tpm=100)
    assert all(rl.check("a", 1) is None for _ in range(100))
    assert rl.check("a", 1) is not None
    rl, _ = limiter(rpm=5, tpm=None)
    assert all(rl.check("a", 10**9) is None for _ in range(5))
    assert rl.check("a", 0) is not None


def test_memory_bound_and_eviction():
    rl, clock = limiter(rpm=10, tpm=None, max_keys=100)
    for i in range(1000):
        rl.check(f"k{i}", 0)
        assert len(rl) <= 100
    # refilled buckets are dropped as they are found: after a minute, activity drains them
    clock.t += 120
    for _ in range(200):
        rl.check("hot", 0)
        clock.t += 6  # hot key stays within its rate
    assert len(rl) <= 2
    # least recently used go first
    rl, clock = limiter(rpm=10, tpm=None, max_keys=3)
    for k in ("a", "b", "c"):
        rl.check(k, 0)
    rl.check("a", 0)  # a is now the most recent
    rl.check("d", 0)
    assert rl.available("b")[0] == 10  # evicted: back to full
    assert rl.available("a")[0] == pytest.approx(8)


def test_full_bucket_not_stored():
    rl, clock = limiter(rpm=60, tpm=6000)
    rl.check("a", 100)
    assert len(rl) == 1
    clock.t += 60
    rl.check("b", 0)  # the sweep sees a's bucket refilled
    assert rl.available("a") == (60, 6000)


def test_clock_going_backwards_refills_nothing():
    rl, clock = limiter(rpm=2, tpm=None)
    rl.check("a", 0)
    rl.check("a", 0)
    clock.t -= 100
    assert rl.check("a", 0) is not None


def test_thread_safety():
    rl = RateLimiter(RateLimitConfig(requests_per_minute=1000, tokens_per_minute=None), clock=lambda: 0.0)
    allowed = []

    def worker():
        n = 0
        for _ in range(500):
            if rl.check("shared", 0) is None:
                n += 1
        allowed.append(n)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(allowed) == 1000  # exactly the burst, never more


def test_retry_after_seconds():
    assert retry_after_seconds(0.0001) == 1
    assert retry_after_seconds(1.0) == 1
    assert retry_after_seconds(1.0000000001) == 1  # float noise does not add a second
    assert retry_after_seconds(1.2) == 2
    assert retry_after_seconds(59.9) == 60
