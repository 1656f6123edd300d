"""The worker's lane policy: priority first, then interactive, bulk every Nth job."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import anyio

from katydid.bus.nats_pull import PullLane
from katydid_worker.job_order import JobOrder, lane_order


def test_lane_order() -> None:
    taken = []
    streak = 0
    for _ in range(8):  # both lanes always have work
        lane = lane_order(streak, 4)[1]
        taken.append(lane[0])
        streak = streak + 1 if lane == "interactive" else 0
    assert "".join(taken) == "iiibiiib"
    assert lane_order(10, 0) == ("priority", "interactive", "bulk")  # 0: strict priority
    assert lane_order(0, 1) == ("priority", "bulk", "interactive")  # 1: bulk always first
    assert all(lane_order(n, 4)[0] == "priority" for n in range(8))


class _Lane:
    """A lane as ``PullLane`` offers it: its queued jobs, asked for now or waited for."""

    def __init__(self, jobs: int) -> None:
        self.jobs = jobs
        self.asked = 0
        self.waited = 0

    async def take_now(self) -> str | None:
        self.asked += 1
        if not self.jobs:
            return None
        self.jobs -= 1
        return "job"

    async def take_within(self, timeout_s: float) -> str | None:
        self.waited += 1  # a real lane would wait timeout_s here
        return await self.take_now()


def _take(lanes: dict[str, _Lane], jobs: int, bulk_every: int = 4) -> None:
    lanes.setdefault("priority", _Lane(0))
    worker = SimpleNamespace(_interactive_streak=0, cfg=SimpleNamespace(bulk_every=bulk_every))

    async def take_all() -> None:
        for _ in range(jobs):
            assert await JobOrder._next(worker, lanes) == "job"  # type: ignore[arg-type]

    anyio.run(take_all)


def test_an_empty_bulk_lane_is_asked_once_per_turn_not_before_every_job() -> None:
    lanes = {"interactive": _Lane(12), "bulk": _Lane(0)}
    _take(lanes, 12)
    assert lanes["bulk"].asked == 12 // 4  # once every 4 jobs
    assert lanes["interactive"].waited == 0


def test_queued_uploads_are_taken_without_waiting_on_the_empty_interactive_lane() -> None:
    # A lingering fetch on the empty interactive lane before each bulk job left a worker idle
    # for its whole timeout (0.5 s) per job when only uploads were queued.
    lanes = {"interactive": _Lane(0), "bulk": _Lane(10)}
    _take(lanes, 10)
    assert lanes["interactive"].waited == 0
    assert lanes["bulk"].jobs == 0


def test_with_both_lanes_empty_the_worker_waits_on_the_interactive_lane() -> None:
    lanes = {"interactive": _Lane(0), "bulk": _Lane(0), "priority": _Lane(0)}
    worker = SimpleNamespace(_interactive_streak=0, cfg=SimpleNamespace(bulk_every=4))
    assert anyio.run(JobOrder._next, worker, lanes) is None  # type: ignore[arg-type]
    assert (lanes["interactive"].waited, lanes["bulk"].asked) == (1, 1)
    assert (lanes["priority"].asked, lanes["priority"].waited) == (1, 0)


def test_a_priority_job_is_taken_before_queued_ones_and_takes_no_turn_from_bulk() -> None:
    # A resumed session's first partial must not wait behind a backlog of finals.
    lanes = {"interactive": _Lane(10), "bulk": _Lane(10), "priority": _Lane(2)}
    taken = []
    worker = SimpleNamespace(_interactive_streak=0, cfg=SimpleNamespace(bulk_every=4))

    async def take(n: int) -> None:
        for _ in range(n):
            before = {name: lane.jobs for name, lane in lanes.items()}
            assert await JobOrder._next(worker, lanes) == "job"  # type: ignore[arg-type]
            taken.append(next(n[0] for n, lane in lanes.items() if lane.jobs < before[n]))

    anyio.run(take, 10)
    assert "".join(taken) == "ppiiibiiib"


class _SilentNats:
    """A NATS connection that is down: publishes are kept, nothing is answered."""

    def __init__(self) -> None:
        self.published: list[str] = []
        self.cb: Any = None

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def subscribe(self, subject: str, cb: Any) -> Any:
        self.cb = cb
        return SimpleNamespace(subject=subject)

    async def publish(self, subject: str, payload: bytes, reply: str) -> None:
        self.published.append(subject)


def test_a_lane_keeps_one_request_out_while_nats_does_not_answer() -> None:
    # Unanswered no_wait requests, flushed together on reconnect, would each pull a job to
    # this worker at once.
    clock = [100.0]
    nc = _SilentNats()
    lane = PullLane(nc, None, "d", request_timeout_s=0.01, clock=lambda: clock[0])

    async def asks() -> list[Any]:
        got = [await lane.take_now() for _ in range(5)]  # NATS down: none answered
        clock[0] += 1.0  # three timeouts later: taken as lost, asked again
        got.append(await lane.take_now())
        await nc.cb(SimpleNamespace(headers={"Status": "404"}))  # a late "none"
        got.append(await lane.take_now())  # that answer ends the wait: a new request
        return got

    assert anyio.run(asks) == [None] * 7
    assert len(nc.published) == 3
