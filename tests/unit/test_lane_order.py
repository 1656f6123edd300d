"""The worker's lane policy: interactive first, bulk every Nth job."""

from __future__ import annotations

from types import SimpleNamespace

import anyio
import nats.errors

from katydid_worker.worker import Worker, lane_order


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


class _Lane:
    """A pull subscription's ``fetch``: its queued jobs, or a timeout when it has none."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.fetches = 0

    async def fetch(self, batch: int, timeout: float) -> list[str]:  # noqa: ASYNC109 - its API
        self.fetches += 1
        if not self.jobs:
            raise nats.errors.TimeoutError
        self.jobs -= 1
        return ["job"]


def test_an_empty_bulk_lane_is_probed_once_per_turn_not_before_every_job() -> None:
    # Each probe of an empty lane waits for its fetch timeout (50 ms for bulk): before every
    # job, as it was once bulk's turn had come, that cost the seed load 13% of its workers.
    lanes = {"interactive": _Lane(12), "bulk": _Lane(0)}
    worker = SimpleNamespace(_interactive_streak=0, cfg=SimpleNamespace(bulk_every=4))

    async def take_all() -> None:
        for _ in range(12):
            assert await Worker._next(worker, lanes) == "job"  # type: ignore[arg-type]

    anyio.run(take_all)
    assert lanes["bulk"].fetches == 12 // 4  # once every 4 jobs
