"""The load tester's retry policy: growing waits, jitter within bounds, retry_after honoured."""

from __future__ import annotations

import random

import pytest

from katydid.load.backoff import RetryPolicy


def test_waits_grow_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(base_s=0.5, max_s=4.0, max_attempts=10, jitter=0.0)
    rng = random.Random(1)
    assert [policy.delay_s(n, rng=rng) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_jitter_stays_within_its_fraction() -> None:
    policy = RetryPolicy(base_s=1.0, max_s=8.0, jitter=0.5)
    rng = random.Random(7)
    waits = [policy.delay_s(3, rng=rng) for _ in range(1000)]
    assert all(2.0 <= w <= 4.0 for w in waits)
    assert max(waits) - min(waits) > 1.5  # it really spreads


def test_server_retry_after_is_a_floor() -> None:
    policy = RetryPolicy(base_s=0.5, max_s=2.0, jitter=0.5)
    rng = random.Random(3)
    waits = [policy.delay_s(1, retry_after_s=10.0, rng=rng) for _ in range(200)]
    assert all(10.0 <= w <= 12.0 for w in waits)


def test_attempts_are_bounded_and_simulated_time_never_spins() -> None:
    policy = RetryPolicy(base_s=0.25, max_s=30.0, max_attempts=5)
    rng = random.Random(0)
    clock = 0.0  # a fake clock: a client refused every time
    attempts = 1
    while policy.may_retry(attempts):
        clock += policy.delay_s(attempts, retry_after_s=1.0, rng=rng)
        attempts += 1
    assert attempts == 5
    assert clock >= 4 * 1.0  # every retry waited at least the server's retry_after


@pytest.mark.parametrize(
    "kwargs", [{"base_s": 0}, {"max_s": 0.1, "base_s": 1}, {"max_attempts": 0}, {"jitter": 2}]
)
def test_invalid_policies(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
