"""The worker's lane policy: interactive first, bulk every Nth job."""

from __future__ import annotations

from katydid_worker.worker import lane_order


def test_lane_order() -> None:
    taken = []
    streak = 0
    for _ in range(8):  # both lanes always have work
        lane = lane_order(streak, 4)[0]
        taken.append(lane[0])
        streak = streak + 1 if lane == "interactive" else 0
    assert "".join(taken) == "iiibiiib"
    assert lane_order(10, 0) == ("interactive", "bulk")  # 0: strict priority
    assert lane_order(0, 1) == ("bulk", "interactive")  # 1: bulk always first
