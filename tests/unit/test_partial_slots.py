"""Partials share the workers with finals: a gateway keeps fewer partials of a model in flight
than the model has workers (one worker left for finals), so a final never waits behind one
partial of every live session."""

from __future__ import annotations

import pytest

from katydid.bus import LaneStats
from katydid.bus.memory import MemoryBus
from katydid.config import Config
from katydid.gateway import seating
from katydid.gateway.hub import Hub
from katydid.gateway.live import Live, apply
from katydid.gateway.native_wire import receive_text
from katydid.gateway.outputs import Admit, Publish
from tests.unit.test_session import _speech_like


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def _gateway(
    monkeypatch: pytest.MonkeyPatch, workers: int, ahead: int = 32
) -> tuple[Hub, MemoryBus, str, _Clock]:
    clock = _Clock()
    monkeypatch.setattr(seating, "clock", clock)
    bus = MemoryBus()
    gateway = Hub(
        Config(chunk_min_s=5.0, partial_interval_s=1.0, resume_first_partials=ahead), bus=bus
    )
    model = gateway.admission.default_model
    for i in range(workers):
        bus.heartbeat(f"w{i}", model)
    gateway.admission.polled(await bus.lane_stats([model]), {})
    return gateway, bus, model, clock


def _backlog(gateway: Hub, model: str, pending: int) -> None:
    """The last queue poll saw ``pending`` jobs waiting in the model's interactive lane."""
    stats = LaneStats(pending=pending, in_progress=2, delivered_stream_seq=0, redelivered=0)
    gateway.admission.polled({(model, "interactive"): stats}, {})


def _resumed(gateway: Hub) -> Live:
    live = _streaming(gateway)
    live.session._ahead = True  # as Session.reattached sets it (a turn ahead granted)
    return live


def _streaming(gateway: Hub) -> Live:
    live = gateway.open_session("websocket")
    (admit,) = receive_text(live.session, '{"type": "start", "partials": true}', 0.0)
    assert isinstance(admit, Admit)
    gateway.seating.admit(live, admit)
    return live


async def _speak(gateway: Hub, live: Live, model: str, audio: bytes) -> int:
    """Audio from the client, as the native door hands it on; the partials it queued."""
    allowed = gateway.seating.partials_allowed(model, resumed=live.session.awaits_first_partial)
    partials = 0
    for out in live.session.receive_bytes(audio, 0.0, partials_allowed=allowed):
        if isinstance(out, Publish):
            partials += out.job.options.kind == "partial"
            assert await gateway.seating.publish(live, out) == []
    return partials


@pytest.mark.parametrize(("workers", "slots"), [(0, 1), (1, 1), (2, 1), (3, 2), (8, 7)])
async def test_one_worker_is_left_for_finals(
    monkeypatch: pytest.MonkeyPatch, workers: int, slots: int
) -> None:
    gateway, _, model, _ = await _gateway(monkeypatch, workers=workers)
    assert gateway.admission.partial_slots[model] == slots


async def test_partials_in_flight_are_bounded_by_the_slots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway, bus, model, _ = await _gateway(monkeypatch, workers=3)
    lives = [_streaming(gateway) for _ in range(4)]
    speech = _speech_like(1.0, pause_every_s=10.0)
    queued = [await _speak(gateway, live, model, speech) for live in lives]
    assert queued == [1, 1, 0, 0]  # two slots: the other two sessions' partials wait
    assert not gateway.seating.partials_allowed(model)
    first = next(q for q in bus.published if q.job.options.kind == "partial")
    bus.answer(bus.take(first.stream_seq), "hello")
    assert gateway.seating.partials_allowed(model)  # its slot is free
    assert await _speak(gateway, lives[2], model, b"") == 1  # due since its 1 s of speech
    assert not gateway.seating.partials_allowed(model)


async def test_a_skipped_partial_and_one_of_a_session_gone_free_their_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway, bus, model, _ = await _gateway(monkeypatch, workers=1)
    first, second = _streaming(gateway), _streaming(gateway)
    speech = _speech_like(1.0, pause_every_s=10.0)
    assert await _speak(gateway, first, model, speech) == 1
    assert await _speak(gateway, second, model, speech) == 0
    (partial,) = bus.published
    gateway.close_session(first)  # the client left meanwhile
    bus.answer(bus.take(partial.stream_seq), error={"code": "expired", "message": "late"})
    assert await _speak(gateway, second, model, b"") == 1


async def test_a_partial_never_answered_stops_counting_after_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway, _, model, clock = await _gateway(monkeypatch, workers=1)
    first, second = _streaming(gateway), _streaming(gateway)
    speech = _speech_like(1.0, pause_every_s=10.0)
    assert await _speak(gateway, first, model, speech) == 1  # its worker dies with it
    clock.now += gateway.cfg.partial_deadline_s
    assert await _speak(gateway, second, model, speech) == 0  # a worker may still answer it
    clock.now += seating._PARTIAL_DECODE_S
    assert await _speak(gateway, second, model, b"") == 1


async def test_a_resumed_sessions_first_partial_goes_over_the_slots_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway, bus, model, _ = await _gateway(monkeypatch, workers=2)  # one slot
    speech = _speech_like(1.0, pause_every_s=10.0)
    busy, back = _streaming(gateway), _streaming(gateway)
    assert await _speak(gateway, busy, model, speech) == 1  # the slot is taken
    back.session._ahead = True  # as Session.reattached sets it (a turn ahead granted)
    assert back.session.awaits_first_partial
    assert await _speak(gateway, back, model, speech) == 1  # over the full slots: its first
    assert not back.session.awaits_first_partial
    mine = [q for q in bus.published if q.job.session_id == back.session.session_id]
    assert mine[-1].lane == "priority"
    bus.answer(bus.take(mine[-1].stream_seq), "so far")  # its own partial answered...
    assert back.inbox is not None
    apply(back.session, back.inbox.popleft())  # ...and applied, as its driver would
    assert not back.session._partial_in_flight  # so only the slot holds its next one back
    assert await _speak(gateway, back, model, speech) == 0  # its next ones wait for a slot
    assert not gateway.seating.partials_allowed(model, resumed=False)


async def test_behind_a_backlog_a_resumed_sessions_first_partial_goes_ahead_of_the_queue(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Over capacity no live session gets partials, and a resumed client's first result was the
    # next final, seconds behind the backlog: its first partial goes to the priority lane.
    gateway, bus, model, _ = await _gateway(monkeypatch, workers=2, ahead=2)
    _backlog(gateway, model, pending=50)
    speech = _speech_like(1.0, pause_every_s=10.0)
    assert await _speak(gateway, _streaming(gateway), model, speech) == 0  # backed up
    backs = [_resumed(gateway) for _ in range(3)]
    assert [await _speak(gateway, b, model, speech) for b in backs] == [1, 1, 0]  # bound: 2
    lanes = [q.lane for q in bus.published if q.job.options.kind == "partial"]
    assert lanes == ["priority", "priority"]
    first = next(q for q in bus.published if q.job.options.kind == "partial")
    bus.answer(bus.take(first.stream_seq), "back")
    assert await _speak(gateway, backs[2], model, b"") == 1  # a place ahead is free again
    assert bus.published[-1].lane == "priority"


async def test_with_none_ahead_a_resumed_sessions_first_partial_waits_out_a_backlog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway, bus, model, _ = await _gateway(monkeypatch, workers=2, ahead=0)
    speech = _speech_like(1.0, pause_every_s=10.0)
    _backlog(gateway, model, pending=50)
    back = _resumed(gateway)
    assert await _speak(gateway, back, model, speech) == 0
    _backlog(gateway, model, pending=0)
    assert await _speak(gateway, back, model, b"") == 1
    assert bus.published[-1].lane == "interactive"
