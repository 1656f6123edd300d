"""Wyoming framing against the wyoming package's own reader and writer."""

from __future__ import annotations

import io

import pytest
from wyoming.event import Event, read_event, write_event

from katydid.gateway.wyoming_wire import FramingError, WyomingEvent, WyomingReader, encode


def _reader() -> WyomingReader:
    return WyomingReader(max_line=1024, max_data=1024, max_payload=4096)


def test_what_the_package_writes_is_read_byte_by_byte() -> None:
    out = io.BytesIO()
    write_event(
        Event("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, b"\x01\x02" * 100), out
    )
    write_event(Event("describe"), out)
    reader = _reader()
    events = []
    for byte in out.getvalue():  # split anywhere: headers, data and payload across reads
        reader.feed(bytes([byte]))
        while (event := reader.next_event()) is not None:
            events.append(event)
    assert events == [
        WyomingEvent("audio-chunk", {"rate": 16000, "width": 2, "channels": 1}, b"\x01\x02" * 100),
        WyomingEvent("describe", {}, None),
    ]


def test_what_we_write_the_package_reads() -> None:
    data = encode(WyomingEvent("transcript", {"text": "Grüße", "language": "de"}))
    event = read_event(io.BytesIO(data))
    assert event is not None
    assert (event.type, event.data) == ("transcript", {"text": "Grüße", "language": "de"})


@pytest.mark.parametrize(
    "raw",
    [
        b"x" * 2000,  # a line over the bound, no newline yet
        b"not json\n",
        b'["a list"]\n',
        b'{"type": "audio-chunk", "payload_length": 99999}\n',
        b'{"type": "audio-chunk", "payload_length": -1}\n',
        b'{"type": "audio-chunk", "data_length": 4}\n[1,2',
        b'{"type": "describe", "data_length": NaN}\n',
    ],
)
def test_garbage_is_a_framing_error(raw: bytes) -> None:
    reader = _reader()
    reader.feed(raw)
    with pytest.raises(FramingError):
        reader.next_event()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type": "describe", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}\n",
        b'{"type": "describe", "data_length": 100000}\n' + b"[" * 50_000 + b"]" * 50_000,
    ],
)
def test_json_nested_past_the_parsers_limit_is_a_framing_error(raw: bytes) -> None:
    # json.loads raises RecursionError here, not ValueError: it once ended the whole server.
    reader = WyomingReader(max_line=200_000, max_data=200_000, max_payload=4096)
    reader.feed(raw)
    with pytest.raises(FramingError):
        reader.next_event()


async def test_a_network_off_the_allowlist_gets_unauthorized_and_is_disconnected() -> None:
    """The Wyoming door has no authentication: a peer outside ``wyoming_allow`` gets an error
    event with code ``unauthorized`` and the connection ends; nothing reaches a session."""
    import trio

    from katydid.bus.memory import MemoryBus
    from katydid.config import Config
    from katydid.gateway.hub import Hub
    from katydid.gateway.wyoming import WyomingDoor

    cfg = Config(wyoming_port=0, wyoming_allow="10.0.0.0/8")
    gateway = Hub(cfg, bus=MemoryBus())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(WyomingDoor(gateway).run)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(encode(WyomingEvent("describe", {})))
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(4096):
                data += chunk
        await stream.aclose()
        event = read_event(io.BytesIO(data))
        assert event is not None
        assert event.type == "error"
        assert event.data["code"] == "unauthorized"
        assert not gateway.sessions
        nursery.cancel_scope.cancel()


async def test_an_unforeseen_error_ends_its_connection_never_the_door(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import trio

    from katydid.bus.memory import MemoryBus
    from katydid.config import Config
    from katydid.gateway import wyoming
    from katydid.gateway.hub import Hub

    calls = 0
    real = WyomingReader.next_event

    def next_event(self: WyomingReader) -> WyomingEvent | None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RecursionError("unforeseen")
        return real(self)

    monkeypatch.setattr(WyomingReader, "next_event", next_event)
    gateway = Hub(Config(wyoming_port=0), bus=MemoryBus())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(wyoming.WyomingDoor(gateway).run)
        for expected in (b"", b'{"type": "info"'):  # cut off; then the door still answers
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(encode(WyomingEvent("describe", {})))
            with trio.fail_after(5):
                try:
                    first = await stream.receive_some(15)
                except trio.BrokenResourceError:  # reset: the door closed what it had unread
                    first = b""
            await stream.aclose()
            assert first == expected
        nursery.cancel_scope.cancel()
