"""The OpenAI Realtime door (``realtime.py``) as hypercorn runs it, an ASGI app, here on memory
channels: the real gateway and session core over ``MemoryBus`` (the test plays the workers),
under trio's MockClock (autojump), so its timeouts are tested, not slept."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import soxr
import trio
import trio.testing

from katydid.bus.memory import MemoryBus
from katydid.config import Config
from katydid.gateway import Hub
from katydid.gateway.http_wire import Message
from katydid.gateway.realtime import Realtime
from tests.signals import vowel

MODEL = "tiny.en-q8_0"


def _speech_24k(seconds: float, pause_every_s: float = 1.5, pause_s: float = 0.8) -> bytes:
    t = np.arange(int(seconds * 16_000)) / 16_000
    voiced = (t % (pause_every_s + pause_s)) < pause_every_s
    audio = soxr.resample((vowel(seconds, 0.3) * voiced).astype(np.float32), 16_000, 24_000)
    pcm: bytes = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    return pcm


@dataclass
class Client:
    """The client's side of an ASGI WebSocket (what hypercorn would carry)."""

    to_app: trio.MemorySendChannel[dict[str, Any]]
    from_app: trio.MemoryReceiveChannel[dict[str, Any]]
    over: trio.Event  # the app returned (the connection is over for the server)

    async def send(self, event: dict[str, Any]) -> None:
        await self.to_app.send({"type": "websocket.receive", "text": json.dumps(event)})

    async def append(self, pcm: bytes, step: int = 4800) -> None:
        for i in range(0, len(pcm), step):
            audio = base64.b64encode(pcm[i : i + step]).decode()
            await self.send({"type": "input_audio_buffer.append", "audio": audio})

    async def next(self) -> dict[str, Any] | int:
        """The server's next event, or its close code (fails within an hour of mock time)."""
        with trio.fail_after(3600):
            message = await self.from_app.receive()
        if message["type"] == "websocket.close":
            return int(message["code"])
        assert message["type"] == "websocket.send", message
        return dict(json.loads(message["text"]))


@dataclass
class Rig:
    gateway: Hub
    bus: MemoryBus
    nursery: trio.Nursery

    async def connect(self, buffer: int = 1000) -> Client:
        to_app, app_receive = trio.open_memory_channel[dict[str, Any]](1000)
        app_send, from_app = trio.open_memory_channel[dict[str, Any]](buffer)
        scope = {"type": "websocket", "headers": [], "query_string": b"intent=transcription"}

        async def receive() -> Message:
            return await app_receive.receive()

        async def send(message: Message) -> None:
            await app_send.send(dict(message))

        over = trio.Event()

        async def app() -> None:
            try:
                await Realtime(self.gateway)(scope, receive, send)
            finally:
                over.set()

        self.nursery.start_soon(app)
        await to_app.send({"type": "websocket.connect"})
        client = Client(to_app, from_app, over)
        if buffer:
            assert (await from_app.receive())["type"] == "websocket.accept"
        return client


@asynccontextmanager
async def rig(**overrides: Any) -> AsyncIterator[Rig]:
    bus = MemoryBus()
    cfg = Config(**({"worker_heartbeat_s": 1.0e6, "http_port": -1} | overrides))
    gateway = Hub(cfg, bus=bus)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run_bus)
        bus.heartbeat("w0", MODEL)
        try:
            yield Rig(gateway, bus, nursery)
        finally:
            nursery.cancel_scope.cancel()


async def _created(client: Client) -> None:
    kinds = [await client.next(), await client.next()]
    assert [k["type"] for k in kinds if isinstance(k, dict)] == [
        "transcription_session.created",
        "session.created",
    ]


async def _eventually(condition: Any, within_s: float = 600.0) -> None:
    with trio.fail_after(within_s):
        while not condition():  # noqa: ASYNC110 - plain state, on the mock clock
            await trio.sleep(0.05)


async def test_a_turn_is_items_in_order_and_the_next_append_starts_another(
    autojump_clock: Any,
) -> None:
    async with rig() as r:
        client = await r.connect()
        await _created(client)
        await client.append(_speech_24k(7.0))
        await client.send({"type": "input_audio_buffer.commit"})
        await trio.testing.wait_all_tasks_blocked()
        jobs = r.bus.finals()
        assert len(jobs) >= 2
        for q in jobs:
            r.bus.answer(q, f"text {q.job.seq}")
        events: list[dict[str, Any]] = []
        completed: list[dict[str, Any]] = []
        committed: list[dict[str, Any]] = []
        while not committed or len(completed) < len(committed):
            event = await client.next()
            assert isinstance(event, dict), event
            events.append(event)
            completed = [e for e in events if e["type"].endswith("transcription.completed")]
            committed = [e for e in events if e["type"] == "input_audio_buffer.committed"]
        items = [e["item_id"] for e in committed]
        assert [e["previous_item_id"] for e in committed] == [None, *items[:-1]]
        assert [e["item_id"] for e in completed] == items
        texts = [e["transcript"] for e in completed]
        assert texts[: len(jobs)] == [f"text {q.job.seq}" for q in jobs]
        assert all(t == "" for t in texts[len(jobs) :])  # a committed tail with no speech
        deltas = [e for e in events if e["type"].endswith("transcription.delta")]
        assert [d["delta"] for d in deltas] == [f"text {q.job.seq}" for q in jobs]
        await _eventually(lambda: not r.gateway.sessions)  # the turn is over
        # The next append: a new turn (a new session), its items after the last one.
        await client.append(_speech_24k(2.0))
        await client.send({"type": "input_audio_buffer.commit"})
        nxt = await client.next()
        assert isinstance(nxt, dict)
        assert nxt["type"] == "input_audio_buffer.committed"
        assert nxt["previous_item_id"] == items[-1]
        await trio.testing.wait_all_tasks_blocked()
        assert {q.job.session_id for q in r.bus.finals()} - {jobs[0].job.session_id}


async def test_malformed_events_are_answered_and_the_connection_goes_on(
    autojump_clock: Any,
) -> None:
    async with rig() as r:
        client = await r.connect()
        await _created(client)
        await client.to_app.send({"type": "websocket.receive", "text": "{not json"})
        await client.to_app.send({"type": "websocket.receive", "bytes": b"\x00\x01"})
        await client.send({"type": "input_audio_buffer.commit", "event_id": "c1"})
        await client.send({"type": "input_audio_buffer.append", "audio": "%%"})
        codes = []
        for _ in range(4):
            event = await client.next()
            assert isinstance(event, dict)
            assert event["type"] == "error"
            codes.append((event["error"]["code"], event["error"]["event_id"]))
        assert codes == [
            ("invalid_json", None),
            ("invalid_event", None),
            ("input_audio_buffer_commit_empty", "c1"),
            ("invalid_value", None),
        ]
        await client.send({"type": "transcription_session.update", "session": {}})
        updated = await client.next()
        assert isinstance(updated, dict)
        assert updated["type"] == "transcription_session.updated"


async def test_idle_without_a_turn_is_a_timeout_error_then_4008(autojump_clock: Any) -> None:
    async with rig(idle_timeout_s=30.0) as r:
        client = await r.connect()
        await _created(client)
        start = trio.current_time()
        error = await client.next()
        assert isinstance(error, dict)
        assert (error["type"], error["error"]["code"]) == ("error", "timeout")
        assert await client.next() == 4008
        assert trio.current_time() - start == pytest.approx(30.0, abs=0.5)


async def test_a_turn_without_audio_for_idle_timeout_ends_with_4008(autojump_clock: Any) -> None:
    async with rig(idle_timeout_s=30.0) as r:
        client = await r.connect()
        await _created(client)
        await client.append(_speech_24k(1.0))
        event = await client.next()
        while isinstance(event, dict) and event["type"] != "error":
            event = await client.next()
        assert isinstance(event, dict)
        assert event["error"]["code"] == "timeout"
        assert await client.next() == 4008
        await _eventually(lambda: not r.gateway.sessions)


async def test_a_client_that_does_not_read_is_let_go(autojump_clock: Any) -> None:
    """Nothing it is sent is taken (a channel with no room): within ``send_timeout_s`` the
    connection ends, and with it its turn; its jobs are cancelled."""
    async with rig(send_timeout_s=5.0) as r:
        client = await r.connect(buffer=0)
        accept = await client.from_app.receive()
        assert accept["type"] == "websocket.accept"
        await _created(client)  # then it reads no more
        start = trio.current_time()
        await client.append(_speech_24k(3.0))
        await client.send({"type": "input_audio_buffer.commit"})
        await _eventually(lambda: r.bus.finals())
        await _eventually(lambda: not r.gateway.sessions)
        with trio.fail_after(60):  # the connection too: its close could not be sent either
            await client.over.wait()
        assert trio.current_time() - start < 60
        assert r.bus.cancels == [r.bus.finals()[0].job.session_id]


async def test_a_client_committing_faster_than_its_turns_finish_waits_for_one(
    autojump_clock: Any,
) -> None:
    # Each commit leaves a turn finishing (a session with a job in flight): without a bound one
    # connection opened sessions without end.
    async with rig(max_jobs_in_flight=2) as r:
        client = await r.connect()
        await _created(client)
        speech = _speech_24k(1.2, pause_every_s=10.0)
        for _ in range(4):
            await client.append(speech)
            await client.send({"type": "input_audio_buffer.commit"})
        await trio.testing.wait_all_tasks_blocked()
        assert len(r.gateway.sessions) == 2  # the third turn waits for one of them to end
        answered: set[int] = set()

        def answer_new(text: str) -> None:
            for q in r.bus.finals():
                if q.stream_seq not in answered:
                    answered.add(q.stream_seq)
                    r.bus.answer(q, text)

        assert len(r.bus.finals()) == 2
        r.bus.answer(r.bus.finals()[0], "one")  # the first turn ends: the third one starts
        answered.add(r.bus.finals()[0].stream_seq)
        await _eventually(lambda: len(r.bus.finals()) == 3)
        assert len(r.gateway.sessions) == 2
        answer_new("more")
        await _eventually(lambda: len(r.bus.finals()) == 4)
        answer_new("last")
        await _eventually(lambda: not r.gateway.sessions)
