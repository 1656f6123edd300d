"""The sampled logger: bounded lines per window, suppressed counts reported."""

from __future__ import annotations

from typing import Any

from katydid.log import SampledLogger


class _Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.lines.append((event, kw))


def test_burst_then_suppression_then_report() -> None:
    now = [0.0]
    rec = _Recorder()
    log = SampledLogger(rec, burst=3, window_s=10.0, clock=lambda: now[0])
    written = [log.warning("client_gone", n=i) for i in range(1000)]
    assert sum(written) == 3
    assert log.suppressed_total == 997
    # Other events have their own budget.
    assert log.warning("frame_rejected")
    now[0] = 10.0
    assert log.warning("client_gone", n=1000)
    assert rec.lines[-1] == ("client_gone", {"n": 1000, "suppressed": 997})
    assert len(rec.lines) == 5


def test_a_burst_followed_by_silence_is_reported_when_its_window_ends() -> None:
    now = [0.0]
    rec = _Recorder()
    log = SampledLogger(rec, burst=2, window_s=10.0, clock=lambda: now[0])
    for i in range(50):
        log.warning("session", n=i)
    assert log.flush() == 0  # the window is still open
    now[0] = 10.0
    assert log.flush() == 1
    assert rec.lines[-1] == ("session", {"suppressed": 48, "summary": True})
    assert log.flush() == 0  # reported once
    assert log.warning("session", n=50)  # a new window, a new budget
    assert rec.lines[-1] == ("session", {"n": 50})
