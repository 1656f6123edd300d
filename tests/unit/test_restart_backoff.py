"""How long `katydid serve` waits before restarting a child that exited."""

from __future__ import annotations

from katydid.child_processes import restart_backoff


def test_a_restart_waits_longer_each_crash_and_starts_over_after_a_minute_up() -> None:
    # One rule for the workers and the embedded nats-server that `serve` restarts.
    waits = [0.5]
    for _ in range(6):
        waits.append(restart_backoff(waits[-1], lived_s=2.0, max_s=10.0))
    assert waits == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert restart_backoff(10.0, lived_s=61.0, max_s=10.0) == 0.5
