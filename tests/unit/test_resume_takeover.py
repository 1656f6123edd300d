"""A resume takes a session over from the record its earlier connection wrote last, even when
that connection's last words (its "detached", with all the audio it had) were still queued."""

from __future__ import annotations

from katydid.bus.memory import MemoryBus
from katydid.config import Config
from katydid.gateway.events import ServerEvent
from katydid.gateway.hub import Hub
from katydid.gateway.inputs import Resume
from katydid.gateway.outputs import Reattach, Remember
from katydid.session_record import DETACHED
from tests.unit.test_partial_slots import _streaming
from tests.unit.test_session import _speech_like


async def test_a_takeover_writes_the_earlier_connections_queued_record_first() -> None:
    bus = MemoryBus()
    hub = Hub(Config(chunk_min_s=5.0), bus=bus)  # its writer loop not running: writes queue
    old = _streaming(hub)
    sid = old.session.session_id
    assert await hub.resumption.recorded(old, final=True) is None  # as before a first job
    assert bus.records[sid].audio_s == 0.0
    old.session.receive_bytes(_speech_like(3.0, pause_every_s=10.0), 0.0)
    outputs = old.session.detach()  # the connection dropped
    assert outputs == [Remember(DETACHED)]
    hub.resumption.remember(old, DETACHED)  # queued, not written yet
    del hub.sessions[sid]  # its connection is over here (as the hub ends a detached one)
    assert bus.records[sid].state == "attached"

    new = hub.open_session("websocket")
    sent: list[ServerEvent] = []

    async def send(event: ServerEvent) -> None:
        sent.append(event)

    (ask,) = new.session.receive(Resume(sid, hub.resumption.token(sid), -1), 0.0)
    assert isinstance(ask, Reattach)
    await hub.resumption.reattach(new, ask, hub.adopt, send)
    assert type(sent[0]).__name__ == "Resumed"
    assert new.session._catch_up_s == 3.0  # what the old connection had, not its first record
    assert bus.records[sid].state == "attached"
    assert bus.records[sid].owner == new.owner
