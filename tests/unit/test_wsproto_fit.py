"""What the gateway changes in wsproto's connections (gateway/wsproto_fit.py): the same events,
less held between reads. Against the wsproto installed: a wsproto that changed shape fails here
instead of silently holding more."""

from __future__ import annotations

import gc
import sys

from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage
from wsproto.frame_protocol import CloseReason

from katydid.gateway.wsproto_fit import fitted, lightened


def _client() -> Connection:
    return Connection(ConnectionType.CLIENT)


def _events(conn: Connection, data: bytes) -> list[tuple[str, object, bool]]:
    conn.receive_data(data)
    return [_shape(e) for e in conn.events()]


def _shape(event: Event) -> tuple[str, object, bool]:
    if isinstance(event, (TextMessage, BytesMessage)):
        return (type(event).__name__, event.data, event.message_finished)
    if isinstance(event, CloseConnection):
        return ("close", event.code, True)
    if isinstance(event, Ping):
        return ("ping", event.payload, True)
    return (type(event).__name__, None, True)


def test_the_installed_wsproto_is_fitted() -> None:
    assert fitted(lightened(Connection(ConnectionType.SERVER)))
    assert not fitted(Connection(ConnectionType.SERVER))


def test_a_fitted_connection_yields_what_wsproto_s_own_does() -> None:
    client = _client()
    # (wsproto refuses to frame after its own close: the frames are built one by one.)
    parts = [
        client.send(TextMessage("héllo")),
        client.send(BytesMessage(b"a" * 300, message_finished=False)),
        client.send(Ping(b"p")),
        client.send(BytesMessage(b"b" * 20_000)),
        client.send(TextMessage("last")),
        client.send(CloseConnection(CloseReason.NORMAL_CLOSURE, "bye")),
    ]
    wire = b"".join(parts) + _client().send(TextMessage("after the close"))
    # Fed in pieces of every size, as reads cut them.
    for step in (1, 7, 1000, len(wire)):
        ours, theirs = (
            lightened(Connection(ConnectionType.SERVER)),
            Connection(ConnectionType.SERVER),
        )
        got_ours: list[tuple[str, object, bool]] = []
        got_theirs: list[tuple[str, object, bool]] = []
        for i in range(0, len(wire), step):
            got_ours += _events(ours, wire[i : i + step])
            got_theirs += _events(theirs, wire[i : i + step])
        assert got_ours == got_theirs
        assert ("close", CloseReason.NORMAL_CLOSURE, True) in got_ours
        assert not any(e[1] == "after the close" for e in got_ours)


def test_a_protocol_error_ends_the_parser_as_it_ends_wsproto_s() -> None:
    # A client's frame must be masked: an unmasked one is a protocol error (1002), after which
    # nothing more is parsed, whatever comes.
    unmasked = b"\x81\x03abc"
    for conn in (lightened(Connection(ConnectionType.SERVER)), Connection(ConnectionType.SERVER)):
        events = _events(conn, unmasked)
        assert events == [("close", CloseReason.PROTOCOL_ERROR, True)]
        assert _events(conn, _client().send(TextMessage("more"))) == []


def test_the_parser_holds_no_message_once_it_is_taken() -> None:
    # wsproto's generator held the last frame it yielded (payload and all) until the next read.
    conn = lightened(Connection(ConnectionType.SERVER))
    client = _client()
    conn.receive_data(client.send(BytesMessage(b"x" * 16_000)) + client.send(TextMessage("next")))
    events = conn.events()
    first = next(events)
    assert isinstance(first, BytesMessage)
    data = first.data
    del first
    events.close()
    del events
    gc.collect()
    assert sys.getrefcount(data) == 2  # ``data`` and getrefcount's argument: nobody else
    assert [_shape(e) for e in conn.events()] == [("TextMessage", "next", True)]
