"""The load tester's retry policy: exponential backoff with jitter, bounded attempts, and the
server's ``retry_after_s`` honoured. Pure: the clock and the randomness are the caller's.

The predecessor's load tool retried in a spin loop and turned one overloaded server into 111,510
failed attempts in 30 s. Here every retry waits, and the waits grow.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter.

    Attributes:
        base_s: the first wait (before jitter).
        max_s: the longest wait from backoff alone (a server's retry_after_s may ask for more).
        max_attempts: attempts in all, the first included; then the session counts as failed.
        jitter: fraction of each wait drawn at random (0 = none, 1 = "full jitter").
    """

    base_s: float = 0.5
    max_s: float = 30.0
    max_attempts: int = 6
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.max_s < self.base_s:
            raise ValueError("need 0 < base_s <= max_s")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be within [0, 1]")

    def may_retry(self, attempts_made: int) -> bool:
        """Whether another attempt is allowed after ``attempts_made`` attempts."""
        return attempts_made < self.max_attempts

    def delay_s(
        self, attempts_made: int, *, retry_after_s: float | None = None, rng: random.Random
    ) -> float:
        """How long to wait before the next attempt.

        Args:
            attempts_made: attempts so far (>= 1).
            retry_after_s: the server's hint, if it gave one; never waited less than that.
            rng: source of jitter.
        """
        ceiling = min(self.max_s, self.base_s * 2.0 ** (attempts_made - 1))
        wait = ceiling * (1.0 - self.jitter * rng.random())
        if retry_after_s is not None and retry_after_s > 0:
            # Spread clients told the same retry_after over a little more, so they do not return
            # in one wave.
            wait = max(wait, retry_after_s * (1.0 + 0.2 * rng.random()))
        return wait
