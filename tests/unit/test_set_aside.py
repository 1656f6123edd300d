"""Jobs waiting for their client are set aside (katydid_worker.set_aside, worker Rule 7;
audience.py, job_order.py): a detached session's, or one whose gateway went silent; a fresh
worker judges no gateway; the set is bounded by bytes and count; set-aside jobs are looked at
once a second, kept in progress, and decoded when their session is live again, past the bound,
or when nothing else is queued."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import anyio
import nats.errors
from prometheus_client import generate_latest

from katydid.config import Config
from katydid.log import SampledLogger
from katydid.messages import Job
from katydid.metrics import GatewayMetrics
from katydid.session_record import ATTACHED, DETACHED, SessionRecord
from katydid_worker.audience import Audience
from katydid_worker.job_order import JobOrder
from katydid_worker.liveness import Check, Liveness, SessionLiveness
from katydid_worker.set_aside import Gateways, SetAside, keep_alive, waiting_why
from katydid_worker.worker_stats import WorkerStats

FAR_MS = 2**53  # a deadline never reached


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeMsg:
    def __init__(self, name: str, size: int = 10, session_id: str = "") -> None:
        self.name = name
        self.data = b"x" * size
        self.headers = (
            Job(f"{name}-j", session_id, 0, 0, "r", FAR_MS, token="t").headers()
            if session_id
            else None
        )
        self.in_progress_calls = 0

    async def in_progress(self) -> None:
        self.in_progress_calls += 1


def _live(state: str = ATTACHED, gateway: str = "g1") -> Check:
    return Check(Liveness.LIVE, state=state, gateway=gateway)


# --- which gateways are gone ---


def test_a_fresh_worker_takes_no_gateway_as_gone() -> None:
    clock = Clock()
    gw = Gateways(1.0, clock=clock)
    assert not gw.silent("dead")  # not even listening yet
    gw.listening()
    for _ in range(5):  # 2.5 s of g1's beats: not yet 3 heartbeats of listening
        gw.heard("g1")
        clock.now += 0.5
    assert not gw.silent("dead")
    clock.now += 0.5
    gw.heard("g1")
    assert gw.silent("dead")  # 3 s listening, never heard
    assert not gw.silent("g1")
    assert not gw.silent("")  # a record without a gateway: nothing to judge


def test_a_gateway_is_gone_after_three_silent_beats_while_another_is_heard() -> None:
    clock = Clock()
    gw = Gateways(1.0, clock=clock)
    gw.listening()
    gw.heard("g1")
    gw.heard("g2")
    clock.now += 2.9
    gw.heard("g2")
    assert not gw.silent("g1")
    clock.now += 0.1
    assert gw.silent("g1")
    gw.heard("g1")  # back (a network blip): its sessions are live again
    assert not gw.silent("g1")
    # Nobody heard for 3 beats (the subscription is deaf, or NATS is away): cannot tell.
    clock.now += 3.0
    assert not gw.silent("g1")
    assert not gw.silent("never")
    # A reconnect missed beats: listening starts again, no gateway gone until 3 beats later.
    gw.heard("g2")
    gw.listening()
    clock.now += 1.0
    gw.heard("g2")
    assert not gw.silent("g1")


def test_gateways_remembered_are_bounded_and_no_heartbeat_means_never_gone() -> None:
    clock = Clock()
    gw = Gateways(1.0, clock=clock, max_gateways=2)
    gw.listening()
    for g in ("a", "b", "c"):
        gw.heard(g)
    clock.now += 3.0
    gw.heard("b")
    gw.heard("c")
    assert gw.silent("a")  # forgotten: as never heard
    off = Gateways(0.0, clock=clock)
    off.listening()
    off.heard("g2")
    clock.now += 1000
    off.heard("g2")
    assert not off.silent("g1")


def test_which_sessions_wait_for_their_client() -> None:
    clock = Clock()
    gw = Gateways(1.0, clock=clock)
    gw.listening()
    clock.now += 5
    gw.heard("live")
    assert waiting_why(_live(DETACHED, "live"), gw) == "detached"
    assert waiting_why(_live(ATTACHED, "dead"), gw) == "gateway_silent"
    assert waiting_why(_live(ATTACHED, "live"), gw) is None
    assert waiting_why(_live("", ""), gw) is None  # a record it could not parse
    for liveness in (Liveness.ORPHANED, Liveness.NO_BUCKET, Liveness.UNCHECKED):
        assert waiting_why(Check(liveness, state=DETACHED, gateway="dead"), gw) is None


# --- the record's state and gateway, from the direct get ---


class FakeNats:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def request(self, subject: str, timeout_s: float) -> Any:
        return SimpleNamespace(headers={"Nats-Sequence": "3"}, data=self.data)


async def test_a_live_check_carries_the_records_state_and_gateway() -> None:
    record = SessionRecord("a" * 32, DETACHED, "g7", "m", {})
    clock = Clock()
    check = await SessionLiveness(FakeNats(record.to_json()).request, 1.0, clock=clock).check(
        "a" * 32
    )
    assert (check.liveness, check.state, check.gateway) == (Liveness.LIVE, DETACHED, "g7")
    garbled = await SessionLiveness(FakeNats(b"not json").request, 1.0).check("b" * 32)
    assert (garbled.liveness, garbled.state, garbled.gateway) == (Liveness.LIVE, "", "")


# --- the set ---


def test_the_set_is_bounded_by_bytes_and_count_oldest_first() -> None:
    clock = Clock()
    aside = SetAside(100, 3, clock=clock)
    for i in range(3):
        aside.add(FakeMsg(f"m{i}", 30), f"s{i % 2}", FAR_MS)
        assert not aside.over()
    assert (len(aside), aside.bytes) == (3, 90)
    assert aside.holds("s0")
    assert aside.holds("s1")
    assert not aside.holds("s2")
    aside.add(FakeMsg("m3", 5), "s2", FAR_MS)
    assert aside.over()  # 4 jobs > 3
    first = aside.oldest()
    assert first is not None
    assert first.msg.name == "m0"
    assert not aside.over()
    aside.add(FakeMsg("big", 20), "s3", FAR_MS)  # 115 bytes > 100
    assert aside.over()
    assert [e.msg.name for e in aside.take_all()] == ["m1", "m2", "m3", "big"]
    assert (len(aside), aside.bytes, aside.holds("s1"), aside.oldest()) == (0, 0, False, None)


def test_each_is_looked_at_again_about_once_a_second() -> None:
    clock = Clock()
    aside = SetAside(1000, 10, clock=clock)
    a = aside.add(FakeMsg("a"), "s", FAR_MS)
    clock.now += 0.5
    b = aside.add(FakeMsg("b"), "s", FAR_MS)
    assert aside.due() == []
    clock.now += 0.5
    assert aside.due() == [a]
    assert aside.due() == []  # looked at now
    clock.now += 0.5
    assert aside.due() == [b]
    aside.look_again([b])  # a pass that ran out of time: due again at once
    assert aside.due() == [b]
    aside.release(b)
    aside.release(b)  # twice: no harm
    assert (len(aside), aside.bytes, aside.holds("s")) == (1, 10, True)
    aside.release(a)
    assert not aside.holds("s")


async def test_one_keep_alive_pass_for_all_held_jobs() -> None:
    msgs = [FakeMsg(str(i)) for i in range(3)]
    with anyio.move_on_after(0.35):
        await keep_alive(lambda: msgs, 0.1)
    assert [m.in_progress_calls for m in msgs] == [3, 3, 3]


# --- the worker's choice of its next job (worker Rule 7, job_order Rule 2) ---


class FakeLane:
    def __init__(self, *msgs: FakeMsg) -> None:
        self.msgs = list(msgs)
        self.lingered = 0

    async def take_now(self) -> FakeMsg | None:
        return self.msgs.pop(0) if self.msgs else None

    async def take_within(self, timeout_s: float) -> FakeMsg | None:
        self.lingered += 1
        return await self.take_now()


class Records:
    """The sessions' checks, as the liveness cache would give them."""

    def __init__(self) -> None:
        self.checks: dict[str, Check] = {}

    async def check(self, session_id: str) -> Check:
        return self.checks.get(session_id, Check(Liveness.ORPHANED, "no record"))


async def _silent_request(subject: str, timeout_s: float) -> Any:
    """A NATS where a gateway asked whether it is there never answers (the heartbeats tell)."""
    raise nats.errors.TimeoutError


@dataclass
class Parts:
    """What a Worker holds for its jobs' audience and order (``Worker.__init__``)."""

    audience: Audience
    order: JobOrder
    stats: WorkerStats


def _worker(clock: Clock, records: Records, max_bytes: int = 1000) -> Parts:
    """A Worker's parts without its engine or NATS: what ``next_job`` and ``_handle``'s
    set-aside step use."""
    cfg = Config(worker_set_aside_bytes=max_bytes)
    sampled = SampledLogger(SimpleNamespace(info=lambda *a, **k: None))
    gateways = Gateways(1.0, clock=clock)
    audience = Audience(cfg, "w", _silent_request, sampled, liveness=records, gateways=gateways)
    stats = WorkerStats("w", "m")
    order = JobOrder(cfg, "w", audience, stats, sampled, anyio.Event())
    order._aside = SetAside(max_bytes, 100, clock=clock)
    gateways.listening()
    clock.now += 5
    gateways.heard("live")
    return Parts(audience, order, stats)


async def _set_aside(w: Parts, msg: FakeMsg) -> bool:
    """``Worker._handle``'s set-aside step for a fresh job."""
    job = Job.from_headers(msg.headers)
    why = await w.audience.waits_for_client(job)
    if why is not None:
        w.order.set_aside(msg, job, why)
    return why is not None


async def test_live_jobs_first_then_resumed_then_the_oldest_when_idle() -> None:
    clock = Clock()
    records = Records()
    w = _worker(clock, records)
    records.checks = {"dead": _live(ATTACHED, "gone"), "away": _live(DETACHED, "live")}
    records.checks["new"] = _live(ATTACHED, "live")
    queued = [FakeMsg(f"dead{i}", session_id="dead") for i in range(3)]
    queued += [FakeMsg("away0", session_id="away"), FakeMsg("new0", session_id="new")]
    lanes: dict[str, Any] = {
        "interactive": FakeLane(*queued),
        "bulk": FakeLane(),
        "priority": FakeLane(),
    }
    decoded: list[str] = []
    for _ in range(5):
        msg, fresh = await w.order.next_job(lanes)
        assert fresh
        if not await _set_aside(w, msg):
            decoded.append(msg.name)
    assert decoded == ["new0"]  # the live session's job, ahead of all the waiting ones
    assert (w.stats.jobs_set_aside, len(w.order._aside)) == (4, 4)
    # The away client resumes (attached on a heard gateway): its job comes before new ones.
    records.checks["away"] = _live(ATTACHED, "live")
    lanes["interactive"].msgs.append(FakeMsg("new1", session_id="new"))
    clock.now += 1.0
    msg, fresh = await w.order.next_job(lanes)
    assert (msg.name, fresh) == ("away0", False)
    msg, fresh = await w.order.next_job(lanes)
    assert (msg.name, fresh) == ("new1", True)
    # Nothing queued: the oldest set-aside job, not a wait on an empty lane.
    msg, fresh = await w.order.next_job(lanes)
    assert (msg.name, fresh) == ("dead0", False)
    assert lanes["interactive"].lingered == 0
    # One session ended meanwhile: released, to be answered 'orphaned' by _handle.
    del records.checks["dead"]
    clock.now += 1.0
    msg, fresh = await w.order.next_job(lanes)
    assert (msg.name, fresh, len(w.order._aside)) == ("dead1", False, 0)
    msg, _ = await w.order.next_job(lanes)
    assert msg.name == "dead2"
    msg, fresh = await w.order.next_job(lanes)  # nothing held: lingers on the lane as before
    assert (msg, fresh, lanes["interactive"].lingered) == (None, True, 1)


async def test_an_idle_decode_of_a_set_aside_job_gives_way_to_a_job_that_comes() -> None:
    clock = Clock()
    records = Records()
    w = _worker(clock, records)
    records.checks = {"dead": _live(ATTACHED, "gone"), "new": _live(ATTACHED, "live")}
    for i in range(2):
        assert await _set_aside(w, FakeMsg(f"dead{i}", session_id="dead"))
    lanes: dict[str, Any] = {"interactive": FakeLane(), "bulk": FakeLane(), "priority": FakeLane()}
    msg, fresh = await w.order.next_job(lanes)  # nothing queued: the oldest, decoded idle
    assert (msg.name, fresh, w.order.idle is not None) == ("dead0", False, True)
    assert not w.order.gave_way()
    # While it decodes, a live session's job comes: the lanes are asked, the decode told to stop.
    lanes["interactive"].msgs.append(FakeMsg("new0", session_id="new"))
    with anyio.fail_after(2):
        await w.order.watch_lanes(lanes)
    assert w.order.gave_way()
    w.order.put_back()  # Worker._handle: the decode stopped, the job unanswered
    assert (len(w.order._aside), w.stats.set_aside_preempted) == (2, 1)
    msg, fresh = await w.order.next_job(lanes)
    assert (msg.name, fresh, w.order.idle) == ("new0", True, None)
    # The job that gave way is still the oldest: it is the next idle decode, not dead1.
    msg, fresh = await w.order.next_job(lanes)
    assert (msg.name, fresh) == ("dead0", False)


async def test_past_the_bound_the_oldest_is_decoded_and_cancelled_ones_leave() -> None:
    clock = Clock()
    records = Records()
    w = _worker(clock, records, max_bytes=25)
    records.checks = {"away": _live(DETACHED, "live"), "live": _live(ATTACHED, "live")}
    for i in range(3):
        assert await _set_aside(w, FakeMsg(f"a{i}", 10, session_id="away"))
    lanes: dict[str, Any] = {"interactive": FakeLane(FakeMsg("x", session_id="live"))}
    lanes["bulk"] = lanes["priority"] = FakeLane()
    msg, fresh = await w.order.next_job(lanes)  # 30 bytes > 25: the oldest goes first
    assert (msg.name, fresh) == ("a0", False)
    assert w.order.idle is None  # past the bound it is decoded whatever comes (no giving way)
    msg, fresh = await w.order.next_job(lanes)
    assert (msg.name, fresh) == ("x", True)
    await w.audience.on_cancel(SimpleNamespace(data=b"away"))
    clock.now += 1.0
    names = [(await w.order.next_job(lanes))[0].name for _ in range(2)]
    assert names == ["a1", "a2"]  # released: _handle answers them 'cancelled'
    # Setting aside off (0 bytes): nothing waits.
    off = _worker(clock, records, max_bytes=0)
    assert not await _set_aside(off, FakeMsg("a", session_id="away"))


async def test_stopping_gives_every_held_job_back_at_once() -> None:
    clock = Clock()
    records = Records()
    w = _worker(clock, records)
    records.checks = {"away": _live(DETACHED, "live")}
    naks: list[str] = []
    msgs = [FakeMsg(f"a{i}", session_id="away") for i in range(2)]
    for m in msgs:
        m.nak = lambda m=m: _record(naks, m.name)  # type: ignore[attr-defined]
        assert await _set_aside(w, m)
    await w.order.give_back_aside()
    assert naks == ["a0", "a1"]
    assert len(w.order._aside) == 0


async def _record(into: list[str], name: str) -> None:
    into.append(name)


def test_the_counts_reach_the_heartbeat_and_the_gateways_metrics() -> None:
    stats = WorkerStats("w1", "m")
    stats.jobs_set_aside, stats.set_aside_now = 7, 2
    beat = json.loads(stats.to_json())
    stats.set_aside_preempted = 3
    beat = json.loads(stats.to_json())
    assert (beat["jobs_set_aside"], beat["set_aside_now"]) == (7, 2)
    text = generate_latest(GatewayMetrics(lambda: {"w1": beat}).registry).decode()
    assert 'katydid_jobs_set_aside_total{worker="w1"} 7.0' in text
    assert 'katydid_jobs_set_aside_now{worker="w1"} 2.0' in text
    assert 'katydid_jobs_set_aside_preempted_total{worker="w1"} 3.0' in text


def test_a_gateway_nats_says_is_gone_is_silent_at_once_and_back_when_heard() -> None:
    clock = Clock()
    gateways = Gateways(1.0, clock=clock)
    gateways.listening()
    gateways.heard("g1")
    assert not gateways.should_ask("g1")  # heard this moment: not asked
    clock.now += 0.6  # half a beat without it: asked (at most every 0.25 s)
    assert gateways.should_ask("g1")
    assert not gateways.should_ask("g1")
    gateways.gone("g1")  # "no responders": its connection is gone
    assert gateways.silent("g1")  # at once, not after 3 beats (nor a worker's first 3 s)
    assert not gateways.should_ask("g1")
    gateways.heard("g1")  # it was a blip: back
    assert not gateways.silent("g1")
