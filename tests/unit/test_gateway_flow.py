"""The gateway and its WebSocket door over an in-memory job bus, under trio's MockClock.

trio-websocket's client on one end of an in-memory stream, the gateway's own WebSocket server
(``ws_transport``) on the other, the real gateway and session core; the
bus is ``MemoryBus``, played by the test as the workers. Time is the mock clock (autojump: a
test that waits for a 120 s timeout takes milliseconds), so timeouts are tested, not slept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import time
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import soxr
import structlog
import structlog.testing
import trio
import trio.lowlevel
import trio.testing
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    wrap_client_stream,
)
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage

from katydid import heap
from katydid.audio import DecodedStream, decode_container, float_to_pcm16
from katydid.bus.memory import MemoryBus, QueuedJob
from katydid.config import Config
from katydid.errors import NatsError, StreamFull
from katydid.gateway import Hub, driver
from katydid.gateway.listening import accept_forever
from katydid.gateway.parking import Parking
from katydid.gateway.websocket import WebSocketDoor, serve_stream
from katydid.metrics import parse_text
from tests.signals import vowel

MODEL = "tiny.en-q8_0"


def _speech_like(seconds: float, pause_every_s: float = 1.5, pause_s: float = 0.8) -> bytes:
    t = np.arange(int(seconds * 16_000)) / 16_000
    voiced = (t % (pause_every_s + pause_s)) < pause_every_s
    return (vowel(seconds, 0.3) * voiced * 32767).astype("<i2").tobytes()


def _config(**overrides: Any) -> Config:
    base: dict[str, Any] = {
        "chunk_min_s": 1.0,
        "file_chunk_min_s": 2.0,
        "file_chunk_max_s": 10.0,
        "chunk_max_s": 10.0,
        "worker_heartbeat_s": 1.0e6,  # heartbeats stay fresh however far the mock clock jumps
        "http_port": -1,
    }
    return Config(**(base | overrides))


def _wav(pcm: bytes) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(pcm)
    return buf.getvalue()


@dataclass
class Rig:
    gateway: Hub
    bus: MemoryBus
    nursery: trio.Nursery
    sessions: trio.Nursery  # the connections' handlers (cancelled = the grace is over)
    # Over a socket pair with the door's parking (a waiting reader parked), else memory streams.
    parking: Parking | None = None
    clients: list[trio.abc.Stream] = field(default_factory=list)  # closed by ``rig`` at its end

    @property
    def parked(self) -> int:
        """Readers parked now (0 over memory streams)."""
        return 0 if self.parking is None else self.parking.parked

    async def connect(self, path: str = "/") -> WebSocketConnection:
        client_stream: trio.abc.HalfCloseableStream
        server_stream: trio.abc.HalfCloseableStream
        if self.parking is None:
            client_stream, server_stream = trio.testing.memory_stream_pair()
        else:
            ours, theirs = trio.socket.socketpair()
            client_stream, server_stream = trio.SocketStream(theirs), trio.SocketStream(ours)
            self.clients.append(client_stream)
        self.sessions.start_soon(
            partial(serve_stream, self.gateway, server_stream, parking=self.parking)
        )
        # trio-websocket's annotation names socket streams; any trio Stream works.
        return await wrap_client_stream(
            self.nursery,
            client_stream,  # type: ignore[arg-type]
            "katydid.test",
            path,
        )


@dataclass
class RawClient:
    """A bare wsproto client: sends a message in the pieces a test chooses."""

    stream: trio.abc.Stream
    peer: WSConnection

    async def send(self, event: BytesMessage | TextMessage) -> None:
        await self.stream.send_all(self.peer.send(event))

    async def next(self) -> dict[str, Any] | int:
        """The server's next event, or its close code."""
        with trio.fail_after(3600):
            while True:
                for e in self.peer.events():
                    if isinstance(e, TextMessage):
                        return dict(json.loads(e.data))
                    if isinstance(e, CloseConnection):
                        return e.code
                self.peer.receive_data(bytes(await self.stream.receive_some()))


async def _raw_connect(r: Rig) -> RawClient:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    r.sessions.start_soon(serve_stream, r.gateway, server_stream)
    peer = WSConnection(ConnectionType.CLIENT)
    await client_stream.send_all(peer.send(Request(host="katydid.test", target="/")))
    peer.receive_data(bytes(await client_stream.receive_some()))
    assert any(isinstance(e, AcceptConnection) for e in peer.events())
    return RawClient(client_stream, peer)


@asynccontextmanager
async def rig(cfg: Config | None = None, *, parked: bool = False) -> AsyncIterator[Rig]:
    bus = MemoryBus()
    gateway = Hub(cfg or _config(), bus=bus)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run_bus)
        bus.heartbeat("w0", MODEL)
        sessions = await nursery.start(_handlers)
        r = Rig(gateway, bus, nursery, sessions, Parking(sessions) if parked else None)
        try:
            yield r
        finally:
            for stream in r.clients:
                await trio.aclose_forcefully(stream)
            nursery.cancel_scope.cancel()


@pytest.fixture(autouse=True)
def _threads_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's threads (upload decoding, heap trimming) run inline here: on the mock
    clock, autojump moves time on while every task waits, and a thread that a loaded machine
    keeps busy for a real second would let minutes of mock time pass, timing sessions out in
    tests that mean nothing of the kind (seen once in CI, under load)."""

    async def inline(fn: Any, *args: Any, **_kw: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", inline)


async def _handlers(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
    """The connections' handlers' nursery, in a task of its own: a test that cancels it (the
    grace is over) goes on awaiting what the clients hear (inside its scope, the test's own
    awaits were cancelled with it, and what followed never ran)."""
    async with trio.open_nursery() as handlers:
        task_status.started(handlers)
        await trio.sleep_forever()


async def _eventually(condition: Any, within_s: float = 600.0) -> None:
    """Until ``condition()`` holds, on the mock clock: fails (not hangs) after ``within_s``."""
    with trio.fail_after(within_s):
        while not condition():  # noqa: ASYNC110 - conditions on plain state, on the mock clock
            await trio.sleep(0.05)


async def _next(ws: WebSocketConnection, *skip: str) -> dict[str, Any]:
    """The next event from the server (skipping types in ``skip``); a server that says nothing
    fails the test within an hour of mock time (milliseconds), instead of hanging it."""
    with trio.fail_after(3600):
        while True:
            event = json.loads(await ws.get_message())
            if event["type"] not in skip:
                return dict(event)


async def _closed(ws: WebSocketConnection) -> int:
    """The close code, once the server has closed (skipping what arrives before it)."""
    with trio.fail_after(3600):
        while True:
            try:
                await ws.get_message()
            except ConnectionClosed as exc:
                code = exc.reason.code if exc.reason is not None else None
                assert isinstance(code, int)
                return code


async def _stream(ws: WebSocketConnection, seconds: float = 9.0, **start: Any) -> str:
    await ws.send_message(json.dumps({"type": "start", **start}))
    ready = await _next(ws)
    assert (ready["type"], ready["model"]) == ("ready", MODEL)
    await ws.send_message(_speech_like(seconds))
    return str(ready["session_id"])


@pytest.mark.parametrize("parked", [False, True], ids=["memory", "parked"])
async def test_results_arrive_in_order_then_done_and_close_1000(
    autojump_clock: Any, parked: bool
) -> None:
    async with rig(parked=parked) as r:
        ws = await r.connect()
        session_id = await _stream(ws)
        await ws.send_message('{"type": "stop"}')
        await _eventually(lambda: len(r.bus.finals()) >= 4)
        await trio.testing.wait_all_tasks_blocked()
        assert r.parked == parked  # waiting for its results, the reader holds no read
        jobs = r.bus.finals(session_id)
        assert [q.job.seq for q in jobs] == list(range(len(jobs)))
        for q in reversed(jobs):  # answered last first: delivered first first
            r.bus.take(q.stream_seq)
            r.bus.answer(q, f"text {q.job.seq}")
        finals = [await _next(ws, "queued") for _ in jobs]
        assert [f["text"] for f in finals] == [f"text {q.job.seq}" for q in jobs]
        done = await _next(ws, "queued")
        assert (done["type"], done["chunks"]) == ("done", len(jobs))
        assert await _closed(ws) == 1000
        await _eventually(lambda: not r.gateway.sessions)
        assert (r.bus.deleted, r.bus.cancels) == ([], [])


@pytest.mark.parametrize("when", ["mid_stream", "after_stop"])
@pytest.mark.parametrize("parked", [False, True], ids=["memory", "parked"])
async def test_a_client_that_leaves_has_its_unanswered_jobs_deleted_and_cancelled(
    autojump_clock: Any, when: str, parked: bool
) -> None:
    async with rig(parked=parked) as r:
        ws = await r.connect()
        session_id = await _stream(ws)
        if when == "after_stop":
            await ws.send_message('{"type": "stop"}')
        await _eventually(lambda: len(r.bus.finals()) >= 3)
        await trio.testing.wait_all_tasks_blocked()
        jobs = r.bus.finals(session_id)
        r.bus.take(jobs[0].stream_seq)
        r.bus.answer(jobs[0], "first")
        assert (await _next(ws, "queued"))["text"] == "first"
        await trio.testing.wait_all_tasks_blocked()
        assert r.parked == parked  # mid-stream too, between two messages
        await ws.aclose()
        await _eventually(lambda: bool(r.bus.cancels))
        await trio.testing.wait_all_tasks_blocked()
        assert r.bus.cancels == [session_id]
        assert sorted(r.bus.deleted) == [q.stream_seq for q in jobs[1:]]
        assert not r.bus.queue  # nothing left for a worker to transcribe for nobody
        assert r.gateway.sessions == {}
        assert r.parked == 0


async def test_a_vosk_session_waiting_for_its_results_is_parked(autojump_clock: Any) -> None:
    async with rig(parked=True) as r:
        ws = await r.connect("/vosk")
        await ws.send_message(_speech_like(9.0))
        await ws.send_message('{"eof" : 1}')
        await _eventually(lambda: len(r.bus.finals()) >= 3)
        await trio.testing.wait_all_tasks_blocked()
        assert r.parked == 1
        await ws.aclose()
        await _eventually(lambda: not r.gateway.sessions)
        assert r.parked == 0


@pytest.mark.parametrize(
    ("send_start", "message"),
    [(False, "no start message within 30 s"), (True, "no message for 120 s")],
)
@pytest.mark.parametrize("parked", [False, True], ids=["memory", "parked"])
async def test_start_and_idle_timeouts_close_4008(
    autojump_clock: Any, send_start: bool, message: str, parked: bool
) -> None:
    cfg = _config(start_timeout_s=30.0, idle_timeout_s=120.0)
    async with rig(cfg, parked=parked) as r:
        ws = await r.connect()
        began = trio.current_time()
        if send_start:
            await ws.send_message('{"type": "start"}')
            assert (await _next(ws))["type"] == "ready"
        error = await _next(ws)
        assert (error["type"], error["code"], error["message"]) == ("error", "timeout", message)
        assert await _closed(ws) == 4008
        assert trio.current_time() - began == pytest.approx(120.0 if send_start else 30.0)


@pytest.mark.parametrize("parked", [False, True], ids=["memory", "parked"])
async def test_result_timeout_after_stop(autojump_clock: Any, parked: bool) -> None:
    async with rig(_config(result_timeout_s=900.0), parked=parked) as r:
        ws = await r.connect()
        session_id = await _stream(ws)
        await ws.send_message('{"type": "stop"}')
        error = await _next(ws, "queued")
        assert error["code"] == "timeout"
        assert "900 s" in error["message"]
        assert await _closed(ws) == 4008
        await _eventually(lambda: bool(r.bus.cancels))
        assert r.bus.cancels == [session_id]


async def test_result_timeout_counts_from_the_last_result(autojump_clock: Any) -> None:
    async with rig(_config(result_timeout_s=900.0)) as r:
        ws = await r.connect()
        session_id = await _stream(ws)
        await ws.send_message('{"type": "stop"}')
        await _eventually(lambda: len(r.bus.finals(session_id)) >= 2)
        stopped = trio.current_time()
        await trio.sleep(800.0)
        r.bus.answer(r.bus.finals(session_id)[0], "first")  # the rest never come
        assert (await _next(ws, "queued"))["text"] == "first"
        error = await _next(ws, "queued")
        assert (error["code"], error["message"]) == ("timeout", "no result for 900 s")
        assert trio.current_time() - stopped >= 1700.0  # 900 s after the result, not the stop


async def test_forged_unknown_and_orphan_results_change_nothing(autojump_clock: Any) -> None:
    async with rig() as r:
        ws = await r.connect()
        session_id = await _stream(ws)
        await _eventually(lambda: len(r.bus.finals()) >= 2)
        first = r.bus.finals(session_id)[0]
        forged = {"job": first.job.job_id, "session": session_id, "seq": 0, "text": "forged"}
        r.gateway._on_result(json.dumps(forged | {"token": "0" * 32}).encode())
        assert r.gateway.counters["forged_results"] == 1
        gone = {"job": "gone-0", "session": "gone", "seq": 0, "text": "x"}
        r.gateway._on_result(json.dumps(gone | {"token": r.gateway.job_token("gone-0")}).encode())
        assert r.gateway.counters["orphan_results"] == 1
        r.bus.answer(first, "real")
        assert (await _next(ws, "queued"))["text"] == "real"


async def _stopped_with_jobs(r: Rig) -> tuple[Any, list[QueuedJob]]:
    """A client that streamed and stopped, and its session's final jobs, all published."""
    ws = await r.connect()
    session_id = await _stream(ws)
    await ws.send_message('{"type": "stop"}')
    await _eventually(lambda: len(r.bus.finals()) >= 3)
    await trio.testing.wait_all_tasks_blocked()
    return ws, r.bus.finals(session_id)


async def test_a_dead_job_fails_its_chunk_and_the_session_goes_on(autojump_clock: Any) -> None:
    async with rig() as r:
        ws, jobs = await _stopped_with_jobs(r)
        r.bus.give_up(jobs[0].stream_seq, deliveries=4)
        error = await _next(ws, "queued")
        assert (error["type"], error["code"], error["seq"]) == ("error", "internal", 0)
        for q in jobs[1:]:
            r.bus.answer(q, "ok")
        events = [await _next(ws, "queued") for _ in jobs]
        assert [e["type"] for e in events] == ["final"] * (len(jobs) - 1) + ["done"]
        assert events[-1]["failed_chunks"] == 1
        assert jobs[0].stream_seq in r.bus.deleted


@pytest.mark.parametrize("electing", [False, True], ids=["nats_back", "nats_electing"])
async def test_a_result_missed_while_nats_reconnected_comes_from_the_results_stream(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch, electing: bool
) -> None:
    # A worker answered a job while the gateway's subscription was down: the job left the
    # stream and its result went to nobody over core NATS, but the results stream kept it.
    # With NATS still electing a leader right after the reconnect, following the session's
    # results is tried again, not given up after one try (its missed result was then counted
    # lost: an `internal` chunk error).
    follow_results = MemoryBus.follow_results
    refusals = [NatsError("no responders"), NatsError("timed out")] * electing

    async def asked(bus: MemoryBus, session_id: str) -> None:
        if refusals:
            raise refusals.pop()
        await follow_results(bus, session_id)

    monkeypatch.setattr(MemoryBus, "follow_results", asked)
    async with rig() as r:
        ws, jobs = await _stopped_with_jobs(r)
        r.bus.take(jobs[0].stream_seq)
        r.bus.answer(jobs[0], "missed", heard=False)
        r.bus.reconnect()
        for q in jobs[1:]:
            r.bus.take(q.stream_seq)
            r.bus.answer(q, "ok")
        events = [await _next(ws, "queued") for _ in range(len(jobs) + 1)]
        assert refusals == []
        assert [e["type"] for e in events] == ["final"] * len(jobs) + ["done"]
        assert [e["text"] for e in events[:-1]] == ["missed"] + ["ok"] * (len(jobs) - 1)
        assert events[-1]["failed_chunks"] == 0


async def test_a_session_starting_while_nats_elects_a_leader_waits_for_its_record(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The record is written before the first job; the bucket does not answer for a few
    # seconds (one write even lands with its answer lost). The session is not told
    # `overloaded`, nor that another connection took it: its jobs go out when NATS is back.
    put_record = MemoryBus.put_record
    failures = ["timeout", "timeout", "lost answer"]  # popped from the end

    async def electing(bus: MemoryBus, record: Any, *, last: int | None = None) -> int | None:
        if last is not None and failures:  # a write over its own earlier one
            why = failures.pop()
            if why == "lost answer":
                await put_record(bus, record, last=last)
            raise NatsError(why)
        return await put_record(bus, record, last=last)

    monkeypatch.setattr(MemoryBus, "put_record", electing)
    async with rig() as r:
        ws, jobs = await _stopped_with_jobs(r)
        assert failures == []
        for q in jobs:
            r.bus.take(q.stream_seq)
            r.bus.answer(q, "ok")
        events = [await _next(ws, "queued") for _ in range(len(jobs) + 1)]
        assert [e["type"] for e in events] == ["final"] * len(jobs) + ["done"]


@pytest.mark.parametrize("electing", [False, True], ids=["nats_back", "nats_electing"])
async def test_a_result_lost_while_nats_reconnected_fails_its_chunk(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch, electing: bool
) -> None:
    # A job left the stream (acked) and its result is nowhere, not even in the results stream
    # (NATS itself lost it). Once reconnected, its chunk fails with a coded error; the jobs
    # still in the stream are left to their workers. With NATS still electing a leader, the
    # check is tried again (given up after one timeout, its session waited for nothing).
    job_in_stream = MemoryBus.job_in_stream
    refusals = [NatsError("timed out")] * (3 if electing else 0)

    async def asked(bus: MemoryBus, stream_seq: int) -> bool:
        if refusals:
            raise refusals.pop()
        return await job_in_stream(bus, stream_seq)

    monkeypatch.setattr(MemoryBus, "job_in_stream", asked)
    async with rig() as r:
        ws, jobs = await _stopped_with_jobs(r)
        del r.bus.queue[jobs[0].stream_seq]  # answered and acked while the gateway was away
        r.bus.reconnect()
        error = await _next(ws, "queued")
        assert (error["type"], error["code"], error["seq"]) == ("error", "internal", 0)
        assert "reconnected to NATS" in error["message"]
        for q in jobs[1:]:
            r.bus.answer(q, "ok")
        events = [await _next(ws, "queued") for _ in jobs]
        assert [e["type"] for e in events] == ["final"] * (len(jobs) - 1) + ["done"]
        assert events[-1]["failed_chunks"] == 1


@pytest.mark.parametrize("resume", [False, True], ids=["no_resume", "resume"])
@pytest.mark.parametrize("parked", [False, True], ids=["memory", "parked"])
async def test_shutdown_with_sessions_in_flight(
    autojump_clock: Any, parked: bool, resume: bool
) -> None:
    """Sessions are told to come back; without resumption their jobs are cancelled, with it
    they are kept (detached) for their clients to resume on another gateway."""
    cfg = _config(resume_window_s=120.0 if resume else 0.0)
    async with rig(cfg, parked=parked) as r:
        sockets = [await r.connect() for _ in range(3)]
        ids = [await _stream(ws) for ws in sockets]
        await sockets[0].send_message('{"type": "stop"}')  # one waiting for its results
        await _eventually(lambda: len({q.job.session_id for q in r.bus.finals()}) == 3)
        await trio.testing.wait_all_tasks_blocked()
        assert r.parked == 3 * parked
        r.gateway.stop()
        late = await r.connect()  # accepted, but not admitted: told to come back
        await late.send_message('{"type": "start"}')
        told = await _next(late)
        assert (told["code"], told["retry_after_s"]) == ("overloaded", 5.0)
        r.sessions.cancel_scope.cancel()  # the grace is over
        for ws in sockets:
            error = await _next(ws, "queued")
            assert (error["code"], error["message"]) == (
                "overloaded",
                "the server is shutting down",
            )
            assert await _closed(ws) == (1001 if resume else 1013)
        await r.gateway.cleanup_done()
        await trio.testing.wait_all_tasks_blocked()
        if resume:
            assert r.bus.cancels == []
            assert len(r.bus.queue) == len(r.bus.finals())  # kept for the clients to resume
            assert {i: r.bus.records[i].state for i in ids} == dict.fromkeys(ids, "detached")
        else:
            assert sorted(r.bus.cancels) == sorted(ids)
            assert not r.bus.queue
            assert r.bus.records == {}
        assert _metric(r.gateway, "katydid_sessions_total", outcome="shutdown") == 4


def _metric(gateway: Hub, name: str, **labels: str) -> float:
    """One series of the gateway's /metrics, by name and labels (a subset of them)."""
    found = 0.0
    for key, value in parse_text(gateway.routes()["/metrics"]().body.decode()).items():
        series, _, rest = key.partition("{")
        if series == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            found += value
    return found


async def test_in_flight_bound_holds_back_reading(autojump_clock: Any) -> None:
    async with rig(_config(max_jobs_in_flight=2)) as r:
        ws = await r.connect()
        await ws.send_message('{"type": "start"}')
        await _next(ws)
        frames = [_speech_like(4.0) for _ in range(12)]  # 48 s: about a dozen chunks
        sender = trio.CancelScope()

        async def send_all() -> None:
            with sender:
                for frame in frames:
                    await ws.send_message(frame)
                await ws.send_message('{"type": "stop"}')

        r.nursery.start_soon(send_all)
        answered = 0
        while True:
            await trio.testing.wait_all_tasks_blocked()
            open_jobs = [q for q in r.bus.finals() if q.stream_seq in r.bus.queue]
            if not open_jobs:
                break
            # One frame's chunks may go over the bound (it is checked between frames).
            assert len(open_jobs) <= 2 + 2
            for q in open_jobs:
                r.bus.answer(q, "x")
                answered += 1
        assert answered >= 10
        events = []
        while (event := await _next(ws, "queued"))["type"] != "done":
            events.append(event)
        assert len(events) == answered


async def test_overloaded_when_the_queue_is_full_or_unreachable(autojump_clock: Any) -> None:
    for failure, reason, retry in [
        (StreamFull("job stream is full"), "stream_full", None),
        (NatsError("NATS request timed out"), "nats_unavailable", 5.0),
    ]:
        async with rig() as r:
            r.bus.fail_publish = failure
            ws = await r.connect()
            await _stream(ws)
            error = await _next(ws)
            assert error["code"] == "overloaded"
            assert error["retry_after_s"] >= 1.0
            if retry is not None:
                assert error["retry_after_s"] == retry
            assert await _closed(ws) == 1013
            await _eventually(lambda r=r: not r.gateway.sessions)
            assert _metric(r.gateway, "katydid_overloaded_total", reason=reason) == 1


async def test_refused_at_start_when_the_queue_wait_exceeds_max_wait(autojump_clock: Any) -> None:
    async with rig() as r:
        r.bus.heartbeat("w0", MODEL, avg_compute_s=1000.0)  # one job takes 1,000 s
        # Nothing ahead: a worker takes the job at once, however long it then runs (the job's
        # own run was counted, and an idle server refused max_wait_s under one job's time).
        first = await r.connect()
        await first.send_message('{"type": "start", "format": "wav", "max_wait_s": 0}')
        assert (await _next(first))["type"] == "ready"
        ws = await r.connect()  # behind the first upload's job: 1,000 s
        await ws.send_message('{"type": "start", "max_wait_s": 60}')
        error = await _next(ws)
        assert (error["code"], error["retry_after_s"]) == ("overloaded", 940.0)
        assert await _closed(ws) == 1013
        assert _metric(r.gateway, "katydid_overloaded_total", reason="max_wait") == 1


async def test_uploads_admitted_at_once_count_ahead_of_each_other(autojump_clock: Any) -> None:
    # Thirty uploads started together each saw an empty queue: none was refused, and the last
    # waited four times its max_wait_s. One worker, 1 s a job.
    async with rig() as r:
        start = '{"type": "start", "format": "wav", "max_wait_s": 1.5}'
        first, second, third = [await r.connect() for _ in range(3)]
        for ws in (first, second, third):
            await ws.send_message(start)
        assert (await _next(first))["type"] == "ready"  # waits 0 s
        assert (await _next(second))["type"] == "ready"  # 1 s: the first's job ahead
        refused = await _next(third)  # 2 s
        assert (refused["code"], refused["retry_after_s"]) == ("overloaded", 1.0)
        # A session that leaves before publishing is no longer counted; a live one never is.
        await first.aclose()
        await _eventually(lambda: len(r.gateway.sessions) == 1)
        later = await r.connect()
        await later.send_message(start)
        assert (await _next(later))["type"] == "ready"
        assert r.gateway.admission.expected == {MODEL: 2}
        live = await r.connect()
        await live.send_message('{"type": "start", "max_wait_s": 7}')
        assert (await _next(live))["type"] == "ready"
        assert r.gateway.admission.expected == {MODEL: 2}
        # One that publishes its job is counted as that job from then on, not twice.
        await second.send_message(_wav(_speech_like(2.0)))
        await second.send_message('{"type": "stop"}')
        await _eventually(lambda: len(r.bus.finals()) == 1)
        assert r.gateway.admission.expected == {MODEL: 1}


async def test_a_lost_queue_connection_ends_waiting_sessions(autojump_clock: Any) -> None:
    async with rig() as r:
        waiting, idle = await r.connect(), await r.connect()
        await _stream(waiting)
        await idle.send_message('{"type": "start"}')
        await _next(idle)
        await _eventually(lambda: bool(r.bus.finals()))
        await trio.testing.wait_all_tasks_blocked()
        r.bus.connected = False  # nats-py reconnecting by itself: alive, and it says so
        health = r.gateway.routes()["/healthz"]()
        assert (health.status, json.loads(health.body)["nats"]) == (200, "reconnecting")
        r.bus.lose()
        error = await _next(waiting, "queued")
        assert (error["code"], error["retry_after_s"]) == ("overloaded", 5.0)
        assert await _closed(waiting) == 1013
        health = r.gateway.routes()["/healthz"]()
        assert health.status == 503
        assert json.loads(health.body)["nats"] == "closed, being replaced"
        await idle.send_message(_speech_like(1.0))  # the idle session carries on
        await trio.testing.wait_all_tasks_blocked()
        assert len(r.gateway.sessions) == 1


@pytest.mark.parametrize("parked", [False, True], ids=["memory", "parked"])
async def test_waiting_clients_hear_their_queue_position(autojump_clock: Any, parked: bool) -> None:
    async with rig(_config(queue_poll_s=1.0), parked=parked) as r:
        ahead = await r.connect()
        await _stream(ahead, seconds=20.0)
        await _eventually(lambda: len(r.bus.finals()) >= 5)
        ws = await r.connect()
        await _stream(ws)
        queued = await _next(ws)
        assert queued["type"] == "queued"
        assert queued["position"] >= 5  # behind the first session's jobs
        assert queued["eta_s"] > 0


async def _never_reading(r: Rig, path: str) -> WebSocketConnection:
    """A client on a lockstep stream (the server's sends wait until the client's side reads the
    bytes) that stops reading once its WebSocket's one-message queue is full."""
    client_stream, server_stream = trio.testing.lockstep_stream_pair()
    r.sessions.start_soon(serve_stream, r.gateway, server_stream)
    return await wrap_client_stream(
        r.nursery,
        client_stream,  # type: ignore[arg-type]
        "katydid.test",
        path,
        message_queue_size=1,
    )


async def test_a_client_that_never_reads_is_cut_off_after_send_timeout(autojump_clock: Any) -> None:
    async with rig(_config(send_timeout_s=30.0)) as r:
        ws = await _never_reading(r, "/")
        session_id = await _stream(ws, partials=False)
        await _eventually(lambda: len(r.bus.finals(session_id)) >= 3)
        await trio.testing.wait_all_tasks_blocked()
        began = trio.current_time()
        for q in r.bus.finals(session_id):  # results the client never reads
            r.bus.answer(q, "x" * 60_000)
        await _eventually(lambda: not r.gateway.sessions)
        assert trio.current_time() - began >= 30.0
        assert _metric(r.gateway, "katydid_sessions_total", outcome="timeout") == 1


async def test_a_vosk_client_that_sends_and_never_reads_is_cut_off(autojump_clock: Any) -> None:
    # vosk answers every audio frame from the reader: that send was unbounded, and a client
    # that kept sending and never read was held for as long as it sent (300 s when tried).
    async with rig(_config(send_timeout_s=30.0)) as r:
        ws = await _never_reading(r, "/vosk")
        await ws.send_message('{"config": {"sample_rate": 16000}}')
        began = trio.current_time()
        with trio.move_on_after(600):
            with contextlib.suppress(ConnectionClosed):
                while r.gateway.sessions or trio.current_time() - began < 1:
                    await ws.send_message(b"\0\1" * 800)  # 100 ms frames, never a read
                    await trio.sleep(0.1)
        assert not r.gateway.sessions
        assert 30.0 <= trio.current_time() - began < 600
        assert _metric(r.gateway, "katydid_sessions_total", outcome="timeout") == 1


async def test_queue_and_worker_metrics_follow_the_bus(autojump_clock: Any) -> None:
    async with rig(_config(queue_poll_s=1.0)) as r:
        r.bus.heartbeat("w0", MODEL, busy=True, fallbacks=3)
        ws = await r.connect()
        session_id = await _stream(ws)
        await _eventually(lambda: len(r.bus.finals(session_id)) >= 3)
        jobs = r.bus.finals(session_id)
        r.bus.take(jobs[0].stream_seq)
        r.bus.take(jobs[0].stream_seq)  # delivered again: a redelivery
        m = r.gateway
        lane = {"model": MODEL, "lane": "interactive"}
        # The next queue poll exports them.
        await _eventually(lambda: _metric(m, "katydid_jobs_redelivered", **lane) == 1)
        assert _metric(m, "katydid_queue_in_progress", **lane) == 1
        assert _metric(m, "katydid_queue_depth", **lane) == len(jobs) - 1
        assert _metric(m, "katydid_jobs_redelivered", **lane) == 1
        assert _metric(m, "katydid_worker_busy", worker="w0") == 1
        assert _metric(m, "katydid_worker_fallbacks_total", worker="w0") == 3
        assert _metric(m, "katydid_nats_connected") == 1
        r.bus.answer(jobs[0], "zero")
        assert (await _next(ws, "queued"))["text"] == "zero"
        assert _metric(m, "katydid_results_total", kind="final", outcome="ok") == 1
        assert _metric(m, "katydid_time_in_queue_seconds_count") == 1
        assert _metric(m, "katydid_jobs_published_total", lane="interactive", kind="final") == len(
            r.bus.finals(session_id)
        )
        r.bus.lose()
        await _eventually(lambda: _metric(m, "katydid_nats_connected") == 0)


async def test_an_upload_is_released_once_decoded_not_when_its_results_come(
    autojump_clock: Any,
) -> None:
    async with rig() as r:
        ws = await r.connect()
        await ws.send_message(json.dumps({"type": "start", "format": "wav"}))
        await _next(ws)
        await ws.send_message(_wav(_speech_like(3.0)))
        await ws.send_message('{"type": "stop"}')
        await _eventually(lambda: len(r.bus.finals()) >= 1)
        await trio.testing.wait_all_tasks_blocked()
        (live,) = r.gateway.sessions.values()
        # Waiting for its result, the session no longer holds the file's bytes (nor its
        # chunker): the upload is closed and gone.
        assert live.session.intake is None
        assert r.gateway.seating.uploads.held == 0
        for q in r.bus.finals():
            r.bus.answer(q, "x")
        assert (await _next(ws, "queued"))["type"] == "final"


async def test_the_gateway_gives_freed_memory_back_on_its_interval(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    trims: list[bool] = []

    def trim() -> bool:  # runs in a thread
        trims.append(True)
        return True

    monkeypatch.setattr(heap, "trim", trim)
    async with rig(_config(malloc_trim_interval_s=10.0)):
        # (Not timed: the trim runs in a thread, whose real time the autojump clock skips.)
        await _eventually(lambda: len(trims) >= 3)
    trims.clear()
    async with rig(_config(malloc_trim_interval_s=0)):
        await trio.sleep(35)
    assert not trims  # 0: never


async def test_an_upload_past_the_gateways_memory_bound_waits_on_disk_and_is_served(
    autojump_clock: Any,
) -> None:
    pcm = _speech_like(3.0)
    async with rig(_config(upload_memory_total_bytes=1)) as r:
        ws = await r.connect()
        await ws.send_message(json.dumps({"type": "start", "format": "wav"}))
        await _next(ws)
        await ws.send_message(_wav(pcm))
        await ws.send_message('{"type": "stop"}')
        await _eventually(lambda: len(r.bus.finals()) >= 1)
        g = r.gateway
        assert _metric(g, "katydid_uploads_spilled") == 1
        assert _metric(g, "katydid_upload_memory_bytes") == 0
        assert b"".join(q.pcm for q in r.bus.finals()) == pcm  # from disk, whole
        for q in r.bus.finals():
            r.bus.answer(q, "x")
        assert (await _next(ws, "queued"))["type"] == "final"


async def test_an_upload_goes_to_its_file_as_it_arrives_not_held_whole(autojump_clock: Any) -> None:
    pcm = _speech_like(3.0)
    wav = _wav(pcm)
    half = len(wav) // 2
    async with rig() as r:
        c = await _raw_connect(r)
        await c.send(TextMessage('{"type": "start", "format": "wav"}'))
        assert (await c.next())["type"] == "ready"  # type: ignore[index]
        await c.send(BytesMessage(wav[:half], message_finished=False))
        await trio.testing.wait_all_tasks_blocked()
        # Half a message in: its bytes are in the upload already (not in a buffer of the
        # connection's until the message ends).
        assert _metric(r.gateway, "katydid_upload_memory_bytes") == half
        await c.send(BytesMessage(wav[half:]))
        await c.send(TextMessage('{"type": "stop"}'))
        await _eventually(lambda: len(r.bus.finals()) >= 1)
        assert b"".join(q.pcm for q in r.bus.finals()) == pcm
        for q in r.bus.finals():
            r.bus.answer(q, "x")
        while (event := await c.next()) != 1000:
            assert isinstance(event, dict)
            assert event["type"] in ("queued", "final", "done")


async def test_an_upload_message_over_the_frame_bound_is_refused_as_it_arrives(
    autojump_clock: Any,
) -> None:
    wav = _wav(_speech_like(3.0))  # 96 KB
    async with rig(_config(max_frame_bytes=40_000)) as r:
        c = await _raw_connect(r)
        await c.send(TextMessage('{"type": "start", "format": "wav"}'))
        assert (await c.next())["type"] == "ready"  # type: ignore[index]
        await c.send(BytesMessage(wav))
        error = await c.next()
        assert isinstance(error, dict)
        assert (error["type"], error["code"]) == ("error", "too_large")
        assert await c.next() == 1009
        await _eventually(lambda: not r.gateway.sessions)
        assert _metric(r.gateway, "katydid_upload_memory_bytes") == 0
        assert not r.bus.finals()


async def test_a_draining_gateway_closes_its_listener() -> None:
    gateway = Hub(_config(host="127.0.0.1", port=0), bus=MemoryBus())
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run_bus)
        door = WebSocketDoor(gateway)
        port = await nursery.start(door.run)
        stream = await trio.open_tcp_stream("127.0.0.1", port)  # accepted
        await stream.aclose()
        door.stop_accepting()
        await trio.testing.wait_all_tasks_blocked()
        # Closed, not accepted and refused: with SO_REUSEPORT the kernel now sends new clients
        # to the gateways that are not draining.
        with pytest.raises(OSError, match="connect"):
            await trio.open_tcp_stream("127.0.0.1", port)
        nursery.cancel_scope.cancel()


async def test_out_of_descriptors_the_gateway_retries_accepting_with_sampled_lines(
    autojump_clock: Any,
) -> None:
    class Full(trio.abc.Listener[trio.abc.Stream]):
        accepts = 0

        async def accept(self) -> trio.abc.Stream:
            await trio.lowlevel.checkpoint()
            Full.accepts += 1
            raise OSError(errno.EMFILE, "Too many open files")

        async def aclose(self) -> None:
            pass

    gateway = Hub(_config(log_sample_burst=5, log_sample_window_s=10.0), bus=MemoryBus())
    with structlog.testing.capture_logs() as lines:
        async with trio.open_nursery() as nursery:
            serve = partial(serve_stream, gateway)
            nursery.start_soon(accept_forever, Full(), nursery, serve, gateway.sampled)
            await trio.sleep(10.0)
            nursery.cancel_scope.cancel()
    assert Full.accepts >= 90  # retried every 0.1 s
    failed = [line for line in lines if line["event"] == "accept_failed"]
    assert 1 <= len(failed) <= 5
    assert failed[0]["error"] == "EMFILE"


async def _upload(r: Rig, data: bytes, fmt: str = "wav") -> WebSocketConnection:
    """A client that has sent a whole file (``start``, the file, ``stop``) and heard ``ready``."""
    ws = await r.connect()
    await ws.send_message(json.dumps({"type": "start", "format": fmt}))
    await _next(ws)
    await ws.send_message(data)
    await ws.send_message('{"type": "stop"}')
    return ws


async def test_an_upload_waiting_for_the_window_has_no_decoder_open(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An open libsndfile decoder holds 16-190 KB: a storm of uploads waiting their turn must not
    # each hold one (nor the file it has read to the end).
    opened: list[Any] = []

    class Counted(DecodedStream):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.is_open = True
            opened.append(self)

        def close(self) -> None:
            self.is_open = False
            super().close()

    monkeypatch.setattr(driver, "DecodedStream", Counted)
    pcm = _speech_like(3.0)
    async with rig(_config(publish_window_bytes=len(pcm))) as r:
        gate = r.bus.publish_gate = trio.Event()
        sockets = []
        try:
            for _ in range(3):
                sockets.append(await _upload(r, _wav(pcm)))
            # (Files are opened and read in threads, which the mock clock does not wait for.)
            await _eventually(
                lambda: r.gateway.window.waits >= 1 and bool(opened) and not opened[0].is_open
            )
            await trio.testing.wait_all_tasks_blocked()
            # The first file is read and its job is on its way under its share; the other two
            # wait for the window with nothing but their upload.
            assert len(r.gateway.sessions) == 3
            assert r.gateway.window.used == len(pcm)
            assert len(opened) == 1
            assert not any(stream.is_open for stream in opened)
        finally:
            gate.set()
        await _eventually(lambda: len(r.bus.finals()) == 3)
        assert len(opened) == 3
        assert not any(stream.is_open for stream in opened)
        for q in r.bus.finals():
            r.bus.answer(q, "x")
        for ws in sockets:
            assert (await _next(ws, "queued"))["type"] == "final"


def _all_decoded(r: Rig) -> bool:
    """Every session's upload is decoded to its end (its intake let go)."""
    return all(live.session.intake is None for live in r.gateway.sessions.values())


@pytest.mark.parametrize("window_bytes", [64 * 1024, 4 * 1024 * 1024, 64 * 1024 * 1024])
async def test_a_long_resampled_upload_is_published_whole_whatever_the_window(
    window_bytes: int,
) -> None:
    # 25 s of 44.1 kHz stereo FLAC: five blocks, each past the share guessed before the file
    # is open (a window smaller than a block, one it fits after a second turn, and a roomy
    # one). Every sample reaches the queue once, in order, as the whole-file decoder gives it.
    # (On the real clock: the blocks decode in threads, which a mock clock does not wait for.)
    mono = np.frombuffer(_speech_like(25.0), dtype="<i2").astype(np.float32) / 32768.0
    stereo = np.stack([soxr.resample(mono, 16_000, 44_100)] * 2, axis=1)
    buf = io.BytesIO()
    sf.write(buf, stereo, 44_100, format="FLAC", subtype="PCM_16")
    data = buf.getvalue()
    want = float_to_pcm16(decode_container(data, max_audio_s=60.0, max_bytes=len(data)))
    async with rig(_config(publish_window_bytes=window_bytes)) as r:
        ws = await _upload(r, data, "flac")
        await _eventually(lambda: r.gateway.window.used == 0 and _all_decoded(r))
        finals = r.bus.finals()
        assert len(finals) >= 3
        assert b"".join(q.pcm for q in finals) == want
        assert r.gateway.window.peak <= window_bytes
        for q in finals:
            r.bus.answer(q, "x")
        events = [await _next(ws, "queued") for _ in finals]
        assert [e["type"] for e in events] == ["final"] * len(finals)


async def test_uploads_are_decoded_and_published_a_window_at_a_time(autojump_clock: Any) -> None:
    pcm = _speech_like(3.0)  # one chunk (chunk_max_s 10): its 96,000 bytes go at the end
    async with rig(_config(publish_window_bytes=len(pcm))) as r:
        gate = r.bus.publish_gate = trio.Event()  # NATS is slow to take them
        sockets = []
        try:
            for _ in range(2):
                sockets.append(await _upload(r, _wav(pcm)))
            await _eventually(lambda: r.gateway.window.waits >= 1)
            await trio.testing.wait_all_tasks_blocked()
            # The first upload's job is on its way and holds the window; the second waits to
            # be decoded at all.
            assert _metric(r.gateway, "katydid_publish_window_bytes") == len(pcm)
            assert _metric(r.gateway, "katydid_publish_window_line") == 1
            assert r.gateway.window.used == len(pcm)
            assert not r.bus.published
        finally:
            gate.set()  # (a publish is shielded: a failed test must not leave it waiting)
        await _eventually(lambda: len(r.bus.finals()) == 2)
        await trio.testing.wait_all_tasks_blocked()
        assert r.gateway.window.used == 0
        assert _metric(r.gateway, "katydid_publish_window_line") == 0
        assert r.gateway.window.peak == len(pcm)
        assert [q.pcm for q in r.bus.finals()] == [pcm, pcm]
        for q in r.bus.finals():
            r.bus.answer(q, "x")
        for ws in sockets:
            assert (await _next(ws, "queued"))["type"] == "final"


async def test_an_unforeseen_error_ends_its_connection_never_the_door(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A RecursionError from a client's JSON once ended a door's nursery, and the server with it.
    async with rig() as r:
        real = r.gateway.seating.refusal
        calls: list[Any] = []

        def refusal(live: Any) -> Any:
            calls.append(live)
            if len(calls) == 1:
                raise RecursionError("unforeseen")
            return real(live)

        monkeypatch.setattr(r.gateway.seating, "refusal", refusal)
        first = await r.connect()
        assert await _closed(first) == 1006  # cut off, no close frame: the server was lost
        await _eventually(lambda: not r.gateway.sessions)
        second = await r.connect()
        await _stream(second, seconds=3.0)
        await second.send_message('{"type": "stop"}')
        await _eventually(lambda: len(r.bus.finals()) >= 1)


async def test_a_session_right_after_the_last_ones_job_is_not_told_to_wait(
    autojump_clock: Any,
) -> None:
    # Until the next queue poll the job just answered was still counted ahead: the next session
    # was told to wait a job's time for an idle worker (refused with max_wait_s 0.5).
    async with rig(_config(queue_poll_s=10_000.0)) as r:  # no poll after the first
        r.bus.heartbeat("w0", MODEL, avg_compute_s=1.0)
        first = await r.connect()
        await first.send_message('{"type": "start", "format": "wav"}')
        assert (await _next(first))["type"] == "ready"
        await first.send_message(_wav(_speech_like(2.0)))
        await first.send_message('{"type": "stop"}')
        await _eventually(lambda: len(r.bus.finals()) == 1)
        r.bus.answer(r.bus.finals()[0], "hello")
        assert (await _next(first, "queued"))["type"] == "final"
        second = await r.connect()
        await second.send_message('{"type": "start", "max_wait_s": 0.5}')
        assert (await _next(second))["type"] == "ready"


async def _event(raw: RawClient) -> dict[str, Any]:
    """The raw client's next event but ``queued`` (a close fails the test)."""
    while True:
        event = await raw.next()
        assert isinstance(event, dict), f"closed with {event}"
        if event["type"] != "queued":
            return event


async def _started(r: Rig, **start: Any) -> tuple[RawClient, str, str]:
    """A raw client whose native session started (with ``start``'s fields): it, the session
    id, its resume token."""
    raw = await _raw_connect(r)
    await raw.send(TextMessage(json.dumps({"type": "start", **start})))
    ready = await _event(raw)
    return raw, ready["session_id"], ready["resume_token"]


async def _detached(r: Rig) -> tuple[str, str]:
    """A native session with a job queued whose connection was reset: its id and token."""
    raw, sid, token = await _started(r)
    await raw.send(BytesMessage(_speech_like(6.0)))
    await _eventually(lambda: len(r.bus.finals(sid)) >= 1)
    await raw.stream.aclose()  # a reset
    await _eventually(lambda: sid in r.bus.records and r.bus.records[sid].state == "detached")
    return sid, token


async def _resume(raw: RawClient, resume: dict[str, Any]) -> None:
    await raw.send(TextMessage(json.dumps({"type": "start", "resume": resume})))


async def test_a_reset_session_resumes_with_every_final_once_and_its_audio_deduped(
    autojump_clock: Any,
) -> None:
    async with rig() as r:
        raw, sid, token = await _started(r)
        pcm = _speech_like(9.0)
        await raw.send(BytesMessage(pcm[: 2 * 16_000 * 6]))  # 6 s before the reset
        await _eventually(lambda: len(r.bus.finals()) >= 2)
        await trio.testing.wait_all_tasks_blocked()
        first = r.bus.finals(sid)
        r.bus.take(first[0].stream_seq)
        r.bus.answer(first[0], "zero")
        assert (await _event(raw))["seq"] == 0
        await raw.stream.aclose()  # a reset: no close frame
        await _eventually(lambda: sid in r.bus.records and r.bus.records[sid].state == "detached")
        assert r.bus.cancels == []  # its jobs go on
        assert len(r.bus.queue) == len(first) - 1
        r.bus.take(first[1].stream_seq)
        r.bus.answer(first[1], "one")  # answered while nobody listens: kept for the resume

        again = await _raw_connect(r)
        resume = {"session_id": sid, "token": token, "after_seq": 0}
        await _resume(again, resume)
        resumed = await _event(again)
        held = r.bus.records[sid].samples
        assert resumed["type"] == "resumed"
        assert (resumed["audio_complete"], resumed["resume_offset_bytes"]) == (False, 2 * held)
        assert held == round(first[-1].job.offset_ms * 16) + len(first[-1].pcm) // 2
        assert (await _event(again))["text"] == "one"  # replayed from the results stream
        await again.send(BytesMessage(pcm[resumed["resume_offset_bytes"] :]))
        await again.send(TextMessage('{"type": "stop"}'))
        await _eventually(lambda: len(r.bus.finals(sid)) > len(first))
        await trio.testing.wait_all_tasks_blocked()
        rest = [q for q in r.bus.finals(sid) if q.job.seq >= 2]
        # Nothing cut twice: the new jobs start where the old ones ended
        assert [q.job.seq for q in rest] == list(range(2, 2 + len(rest)))
        # (its leading silence dropped, as any chunk's: it starts in the pause it was cut at)
        new = rest[len(first) - 2].job.offset_ms
        assert round(held / 16) <= new <= round(held / 16) + 800
        assert sum(len(q.pcm) for q in r.bus.finals(sid)) <= len(pcm)
        for q in rest:
            r.bus.take(q.stream_seq)
            r.bus.answer(q, f"text {q.job.seq}")
        finals = [await _event(again) for _ in rest]
        assert [f["seq"] for f in finals] == [q.job.seq for q in rest]
        done = await _event(again)
        assert (done["type"], done["chunks"]) == ("done", 2 + len(rest))
        assert await again.next() == 1000
        await _eventually(lambda: sid not in r.bus.records)  # ended for good: forgotten
        await _eventually(lambda: r.gateway.sessions == {})  # by neither its id nor its first
        resumption = "katydid_session_resumption_total"
        assert _metric(r.gateway, resumption, event="detached") == 1
        assert _metric(r.gateway, resumption, event="resumed") == 1


async def test_resume_is_refused_coded_and_a_newer_connection_takes_the_session(
    autojump_clock: Any,
) -> None:
    async with rig() as r:
        raw, sid, token = await _started(r)
        await raw.send(BytesMessage(_speech_like(3.0)))
        await _eventually(lambda: sid in r.bus.records)

        async def refused(resume: dict[str, Any]) -> tuple[str, int | dict[str, Any]]:
            other = await _raw_connect(r)
            await _resume(other, resume)
            error = await _event(other)
            return error["code"], await other.next()

        wrong = {"session_id": sid, "token": "f" * 32, "after_seq": -1}
        assert await refused(wrong) == ("unauthorized", 4401)
        unknown = {"session_id": "0" * 32, "token": token, "after_seq": -1}
        assert await refused(unknown) == ("unauthorized", 4401)  # the token is the session's
        assert await refused({"session_id": "x", "token": token}) == ("bad_message", 1008)

        # The client comes back while its old connection still looks alive: the newer wins
        newer = await _raw_connect(r)
        resume = {"session_id": sid, "token": token, "after_seq": -1}
        await _resume(newer, resume)
        assert (await _event(newer))["type"] == "resumed"
        taken = await _event(raw)
        assert taken["code"] == "session_taken"
        assert await raw.next() == 4409
        assert r.bus.cancels == []  # the session's jobs are the newer connection's
        assert _metric(r.gateway, "katydid_session_resumption_total", event="taken_over") == 1
        assert r.gateway.sessions[sid].owner == r.bus.records[sid].owner
        # Ended for good (a normal close), it cannot be resumed
        await newer.send(TextMessage('{"type": "stop"}'))
        await newer.stream.send_all(newer.peer.send(CloseConnection(1000)))
        await _eventually(lambda: sid not in r.bus.records)
        gone = {"session_id": sid, "token": token, "after_seq": -1}
        assert await refused(gone) == ("resume_expired", 4410)


async def test_a_session_taken_over_elsewhere_hears_it_at_its_next_record_write(
    autojump_clock: Any,
) -> None:
    # Another gateway resumed the session and its takeover word never came here: the next
    # write of this connection's record finds the other's revision, and this one ends.
    async with rig() as r:
        raw, sid, _ = await _started(r)
        await raw.send(BytesMessage(_speech_like(3.0)))
        await _eventually(lambda: sid in r.bus.records)
        theirs = dataclasses.replace(r.bus.records[sid], owner="elsewhere:1", gateway="elsewhere")
        await r.bus.put_record(theirs)
        await raw.send(BytesMessage(_speech_like(6.0)))  # chunks: their records are written
        assert (await _event(raw))["code"] == "session_taken"
        assert await raw.next() == 4409
        assert r.bus.records[sid].owner == "elsewhere:1"  # never written over
        assert r.bus.cancels == []


async def test_done_names_the_chunks_with_no_words(autojump_clock: Any) -> None:
    async with rig() as r:
        ws, jobs = await _stopped_with_jobs(r)
        for q in jobs:
            r.bus.answer(q, "" if q.job.seq == 1 else "words")
        events = [await _next(ws, "queued") for _ in range(len(jobs))]
        assert [e["seq"] for e in events[:-1]] == [q.job.seq for q in jobs if q.job.seq != 1]
        assert (events[-1]["type"], events[-1]["silent"]) == ("done", [1])


async def test_a_resume_past_the_sessions_chunks_is_refused_and_the_session_survives_it(
    autojump_clock: Any,
) -> None:
    async with rig() as r:
        sid, token = await _detached(r)
        wrong = await _raw_connect(r)
        resume = {"session_id": sid, "token": token, "after_seq": 999}
        await _resume(wrong, resume)
        refused = await _event(wrong)
        assert (refused["code"], await wrong.next()) == ("bad_message", 1008)
        assert "past the session's last chunk" in refused["message"]
        assert sid in r.bus.records  # a client's bad resume does not end its session
        right = await _raw_connect(r)
        resume["after_seq"] = -1
        await _resume(right, resume)
        assert (await _event(right))["type"] == "resumed"
        assert r.bus.cancels == []


async def test_a_resume_the_server_cannot_serve_now_is_told_to_retry_and_keeps_the_session(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with rig() as r:
        sid, token = await _detached(r)
        follow = MemoryBus.follow_results

        async def refused(bus: MemoryBus, session_id: str) -> None:
            raise NatsError("JetStream error 10026: maximum consumers limit reached")

        monkeypatch.setattr(MemoryBus, "follow_results", refused)
        first = await _raw_connect(r)
        resume = {"session_id": sid, "token": token, "after_seq": -1}
        await _resume(first, resume)
        assert (await _event(first))["type"] == "resumed"
        told = await _event(first)
        assert (told["code"], told["retry_after_s"]) == ("overloaded", 2.0)
        assert await first.next() == 1001  # going away: a client comes back for its session
        # Not ended: its record (detached again) and its jobs wait for the retry.
        await _eventually(lambda: r.bus.records[sid].state == "detached")
        assert r.bus.cancels == []
        monkeypatch.setattr(MemoryBus, "follow_results", follow)
        retry = await _raw_connect(r)
        await _resume(retry, resume)
        assert (await _event(retry))["type"] == "resumed"
        assert r.bus.records[sid].state == "attached"


async def test_a_client_resuming_in_a_loop_does_not_write_a_line_per_resume(
    autojump_clock: Any,
) -> None:
    cfg = _config(log_sample_burst=5, log_sample_window_s=3600.0)
    async with rig(cfg) as r:
        raw, sid, token = await _started(r)
        await raw.send(BytesMessage(_speech_like(3.0)))
        await _eventually(lambda: sid in r.bus.records)
        with structlog.testing.capture_logs() as lines:
            for _ in range(12):
                again = await _raw_connect(r)
                await _resume(again, {"session_id": sid, "token": token, "after_seq": -1})
                assert (await _event(again))["type"] == "resumed"
        resumed = [line for line in lines if line["event"] == "session_resumed"]
        assert len(resumed) == 5
        assert _metric(r.gateway, "katydid_session_resumption_total", event="resumed") == 12


async def test_a_resumed_sessions_first_partial_goes_ahead_once_per_interval(
    autojump_clock: Any,
) -> None:
    # The turn ahead of the queue is in the session's record (any gateway reads it): a client
    # that reconnects over and over gets one partial ahead per resume_first_partial_every_s.
    async with rig() as r:
        raw, sid, token = await _started(r, partials=True)
        speech = _speech_like(2.0, pause_every_s=10.0)
        lanes = []
        for _ in range(2):
            await raw.stream.aclose()  # a reset
            await _eventually(lambda: r.bus.records[sid].state == "detached")
            raw = await _raw_connect(r)
            await _resume(raw, {"session_id": sid, "token": token, "after_seq": -1})
            resumed = await _event(raw)
            assert (resumed["type"], resumed["resume_offset_bytes"]) == ("resumed", 0)
            token = resumed["resume_token"]
            before = len(r.bus.published)
            await raw.send(BytesMessage(speech))
            await _eventually(lambda n=before: len(r.bus.published) > n)
            (partial,) = r.bus.published[before:]
            assert partial.job.options.kind == "partial"
            lanes.append(partial.lane)
            r.bus.take(partial.stream_seq)
            r.bus.answer(partial, "so far")
            assert (await _event(raw))["type"] == "partial"
        assert lanes == ["priority", "interactive"]  # the second resume came within 10 s
        assert r.bus.records[sid].ahead_after_unix > time.time()


async def test_a_resumed_session_hears_where_it_stands_and_its_end_deletes_its_old_jobs(
    autojump_clock: Any,
) -> None:
    # Its jobs' stream seqs are in its record: a resumed client waiting on a backlog is told
    # its place and wait (`queued`), and if it then leaves, its jobs leave the queue with it.
    async with rig() as r:
        raw, sid, token = await _started(r)
        await raw.send(BytesMessage(_speech_like(9.0)))
        await _eventually(lambda: len(r.bus.finals(sid)) >= 3)
        await trio.testing.wait_all_tasks_blocked()
        await raw.send(TextMessage('{"type": "stop"}'))
        await _eventually(lambda: r.bus.records[sid].stopped)
        old = [q.stream_seq for q in r.bus.finals(sid)]
        assert [ss for _, ss in r.bus.records[sid].queued] == old
        await raw.stream.aclose()  # a reset
        await _eventually(lambda: r.bus.records[sid].state == "detached")

        again = await _raw_connect(r)
        await _resume(again, {"session_id": sid, "token": token, "after_seq": -1})
        resumed = await again.next()
        assert isinstance(resumed, dict)
        assert resumed["type"] == "resumed"
        queued = await again.next()  # the next queue poll
        assert isinstance(queued, dict)
        assert queued["type"] == "queued", queued
        assert queued["position"] == 0  # its oldest job is next
        assert queued["eta_s"] > 0
        await again.stream.send_all(again.peer.send(CloseConnection(1000)))  # it leaves
        await _eventually(lambda: set(old) <= set(r.bus.deleted))
        assert sid in r.bus.cancels


async def test_quick_resumes_are_never_told_a_newer_connection_took_the_session(
    autojump_clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An outsider's client: 2 s of speech, a reset, a resume at once, over and over. The old
    # connection's "detached" record write could fail against the resume's takeover and then
    # mark the session taken by the *old* connection here: the resumed one's next final was
    # refused with session_taken (4409), the session lost.
    put_record = MemoryBus.put_record

    async def slow_detach(bus: MemoryBus, record: Any, *, last: int | None = None) -> int | None:
        if record.state == "detached":  # still on the wire when the client resumes
            await trio.sleep(0.05)
        return await put_record(bus, record, last=last)

    monkeypatch.setattr(MemoryBus, "put_record", slow_detach)
    async with rig() as r:
        raw, sid, token = await _started(r)
        speech = _speech_like(2.0, pause_every_s=0.9, pause_s=0.6)
        after = -1
        for _ in range(3):
            await raw.send(BytesMessage(speech))
            await trio.testing.wait_all_tasks_blocked()
            await raw.stream.aclose()  # a reset, then a resume at once
            raw = await _raw_connect(r)
            await _resume(raw, {"session_id": sid, "token": token, "after_seq": after})
            resumed = await raw.next()
            assert isinstance(resumed, dict)
            assert resumed["type"] == "resumed", resumed
            token = resumed["resume_token"]
        await raw.send(BytesMessage(speech))
        await raw.send(TextMessage('{"type": "stop"}'))
        await _eventually(lambda: r.bus.records[sid].stopped)
        for q in r.bus.finals(sid):
            r.bus.take(q.stream_seq)
            r.bus.answer(q, f"text {q.job.seq}")
        while True:
            event = await raw.next()
            assert isinstance(event, dict), f"closed with {event}"
            assert event.get("code") != "session_taken", event
            if event["type"] == "done":
                break


@pytest.mark.parametrize("noticed", [True, False], ids=["reset_noticed", "old_connection_open"])
async def test_a_resumed_sessions_first_partial_waits_for_the_resent_audio(
    autojump_clock: Any, noticed: bool
) -> None:
    # The client resends at once what the server does not hold; a partial made from the first
    # second of it would cover less than the one the client saw before the break.
    async with rig() as r:
        raw, sid, token = await _started(r, partials=True)
        speech = _speech_like(3.0, pause_every_s=10.0)
        half = len(speech) // 2
        for part in (speech[:half], speech[half:]):  # a partial (and a record) after the first
            await raw.send(BytesMessage(part))
            await trio.testing.wait_all_tasks_blocked()
        assert r.bus.records[sid].audio_s == 1.5  # its record as of its partial's publish
        if noticed:
            await raw.stream.aclose()  # a reset, and the resume right after it
        # else the client gave up on a connection the server still holds (half open)
        raw = await _raw_connect(r)
        await _resume(raw, {"session_id": sid, "token": token, "after_seq": -1})
        resumed = await _event(raw)
        assert resumed["resume_offset_bytes"] == 0  # nothing of it is in a final's job
        before = len(r.bus.published)
        await raw.send(BytesMessage(speech[:half]))
        await trio.testing.wait_all_tasks_blocked()
        assert r.bus.published[before:] == []  # 1.5 s of the 3 resent: no partial yet
        await raw.send(BytesMessage(speech[half:]))
        await _eventually(lambda: len(r.bus.published) > before)
        (partial,) = r.bus.published[before:]
        assert partial.job.options.kind == "partial"
        assert len(partial.pcm) == len(speech)  # the utterance as the client had sent it
