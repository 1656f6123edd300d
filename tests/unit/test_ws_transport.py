"""The gateway's WebSocket server side (``ws_transport``) against clients it did not write:
trio-websocket's client for what a well-behaved client does, wsproto's client and raw bytes for
what a broken one does. In-memory streams; no sockets, no sleeps."""

from __future__ import annotations

import socket
import struct
import sys
import tracemalloc
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_client_stream
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason

from katydid.errors import ClientGone
from katydid.gateway.ws_handshake import accept
from katydid.gateway.ws_transport import (
    MessageTooLarge,
    Piece,
    ServerWebSocket,
)
from katydid.gateway.wsproto_fit import lightened

MAX = 64 * 1024


@asynccontextmanager
async def pair(
    max_message: int = MAX,
) -> AsyncIterator[tuple[ServerWebSocket, WebSocketConnection]]:
    """An accepted server side and trio-websocket's client on the other end."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        accepted: list[ServerWebSocket | None] = []
        done = trio.Event()

        async def serve() -> None:
            accepted.append(
                await accept(server_stream, max_message=max_message, timeout_s=5, send_timeout_s=5)
            )
            done.set()

        nursery.start_soon(serve)
        client = await wrap_client_stream(
            nursery,
            client_stream,  # type: ignore[arg-type]
            "katydid.test",
            "/vosk?x=1",
            extra_headers=[(b"Authorization", b"Bearer k1")],
        )
        with trio.fail_after(5):
            await done.wait()
        server = accepted[0]
        assert server is not None
        yield server, client
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def raw_pair(
    *, lockstep: bool = False, send_timeout_s: float = 10.0
) -> AsyncIterator[tuple[ServerWebSocket, trio.abc.Stream, WSConnection]]:
    """An accepted server side and a bare wsproto client that does only what a test tells it
    (trio-websocket's client answers pings and closes by itself). ``lockstep``: a stream with
    no buffer, where a server's send waits until the client reads it (a full TCP window)."""
    if lockstep:
        client_stream, server_stream = trio.testing.lockstep_stream_pair()
    else:
        client_stream, server_stream = trio.testing.memory_stream_pair()  # type: ignore[assignment]
    peer = WSConnection(ConnectionType.CLIENT)
    async with trio.open_nursery() as nursery:
        accepted: list[ServerWebSocket | None] = []

        async def serve() -> None:
            accepted.append(
                await accept(
                    server_stream, max_message=MAX, timeout_s=5, send_timeout_s=send_timeout_s
                )
            )

        nursery.start_soon(serve)
        await client_stream.send_all(peer.send(Request(host="katydid.test", target="/")))
        peer.receive_data(bytes(await client_stream.receive_some()))
        assert any(isinstance(e, AcceptConnection) for e in peer.events())
        await trio.testing.wait_all_tasks_blocked()
        server = accepted[0]
        assert server is not None
        yield server, client_stream, peer
        nursery.cancel_scope.cancel()


async def test_messages_go_both_ways_with_the_handshake_request_kept() -> None:
    async with pair() as (server, client):
        assert server.path == "/vosk?x=1"
        assert (b"authorization", b"Bearer k1") in server.headers
        server.forget_headers()  # read once by the door; a waiting session keeps none
        assert server.headers == ()
        await client.send_message('{"type": "start"}')
        await client.send_message(b"\x01\x02" * 1000)
        assert await server.get_message() == '{"type": "start"}'
        assert await server.get_message() == b"\x01\x02" * 1000
        await server.send_message('{"type": "ready"}')
        assert await client.get_message() == '{"type": "ready"}'


async def test_a_ping_is_answered_while_the_server_reads() -> None:
    async with pair() as (server, client), trio.open_nursery() as nursery:
        got: list[str | bytes] = []

        async def read() -> None:
            got.append(await server.get_message())

        nursery.start_soon(read)
        with trio.fail_after(5):
            await client.ping(b"are you there")  # returns when the pong arrives
        await client.send_message("after")
    assert got == ["after"]


async def test_a_message_over_the_bound_is_refused_as_it_arrives() -> None:
    async with pair(max_message=10_000) as (server, client), trio.open_nursery() as nursery:
        nursery.start_soon(client.send_message, b"\0" * 30_000)
        with pytest.raises(MessageTooLarge) as exc:
            await server.get_message()
        assert exc.value.limit == 10_000
        nursery.cancel_scope.cancel()


async def test_a_read_cancelled_mid_message_loses_nothing(autojump_clock: Any) -> None:
    async with raw_pair() as (server, client_stream, peer):
        # Half a message, then the read is cancelled (a session's deadline), then the rest.
        await client_stream.send_all(peer.send(BytesMessage(b"first-", message_finished=False)))
        with trio.move_on_after(0.5):
            await server.get_message()
        await client_stream.send_all(peer.send(BytesMessage(b"second")))
        assert await server.get_message() == b"first-second"
        await client_stream.send_all(peer.send(TextMessage("é" * 3, message_finished=False)))
        await client_stream.send_all(peer.send(TextMessage("!")))
        assert await server.get_message() == "ééé!"


async def test_a_binary_message_comes_in_the_pieces_it_arrives_in(autojump_clock: Any) -> None:
    async with raw_pair() as (server, client_stream, peer):
        await client_stream.send_all(peer.send(BytesMessage(b"first-", message_finished=False)))
        assert await server.get_message(pieces=True) == Piece(b"first-", 6, last=False)
        await client_stream.send_all(peer.send(BytesMessage(b"second")))
        assert await server.get_message(pieces=True) == Piece(b"second", 12, last=True)
        # Text is whole whatever the caller asks; the next binary message counts from zero.
        await client_stream.send_all(peer.send(TextMessage("stop")))
        assert await server.get_message(pieces=True) == "stop"
        # Begun in whole messages' mode (a read cancelled mid-message), finished in pieces.
        await client_stream.send_all(peer.send(BytesMessage(b"ab", message_finished=False)))
        with trio.move_on_after(0.5):
            await server.get_message()
        await client_stream.send_all(peer.send(BytesMessage(b"cd")))
        assert await server.get_message(pieces=True) == Piece(b"abcd", 4, last=True)
        # The message's bound holds over its pieces.
        await client_stream.send_all(peer.send(BytesMessage(b"\0" * MAX, message_finished=False)))
        size = 0
        while size < MAX:  # read a RECEIVE_BYTES at a time
            got = await server.get_message(pieces=True)
            assert isinstance(got, Piece)
            assert not got.last
            size = got.size
        await client_stream.send_all(peer.send(BytesMessage(b"\0", message_finished=False)))
        with pytest.raises(MessageTooLarge):
            await server.get_message(pieces=True)


async def test_the_clients_close_is_echoed_and_ends_the_connection() -> None:
    async with pair() as (server, client), trio.open_nursery() as nursery:
        nursery.start_soon(client.aclose, 4000, "bye")  # waits for the server's echo
        with pytest.raises(ClientGone) as ended:
            await server.get_message()
        assert not ended.value.said_goodbye  # only 1000 gives the session up
        await trio.testing.wait_all_tasks_blocked()
        assert client.closed is not None
        assert client.closed.code == 4000


async def test_aclose_from_the_writer_while_the_reader_waits() -> None:
    async with pair() as (server, client), trio.open_nursery() as nursery:
        ended: list[str] = []

        async def reader() -> None:
            try:
                await server.get_message()
            except ClientGone:
                ended.append("reader")

        async def client_reads() -> None:
            with pytest.raises(ConnectionClosed) as exc:
                await client.get_message()  # trio-websocket echoes the close by itself
            assert exc.value.reason is not None
            assert exc.value.reason.code == 1000

        nursery.start_soon(reader)
        nursery.start_soon(client_reads)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            await server.aclose(1000, "done")
        ended.append("aclose")
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(ended) == ["aclose", "reader"]
        with pytest.raises(ClientGone):
            await server.send_message("too late")


async def test_a_reader_that_comes_while_aclose_reads_waits_for_the_end() -> None:
    # The writer closes while the reader is elsewhere (waiting for room); the reader then asks
    # for a message while aclose reads for the echo: it waits for the end instead of reading
    # the same stream from a second task, then hears the client is gone.
    async with raw_pair() as (server, client_stream, peer), trio.open_nursery() as nursery:
        closed = trio.Event()

        async def close() -> None:
            await server.aclose(1000, "done")
            closed.set()

        nursery.start_soon(close)
        await trio.testing.wait_all_tasks_blocked()  # aclose sent its close and reads
        assert not closed.is_set()
        outcome: list[str] = []

        async def late_reader() -> None:
            with pytest.raises(ClientGone):
                await server.get_message()
            outcome.append("reader")

        nursery.start_soon(late_reader)
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == []  # waiting, not reading
        peer.receive_data(bytes(await client_stream.receive_some()))
        (close_event,) = list(peer.events())
        assert isinstance(close_event, CloseConnection)
        await client_stream.send_all(peer.send(close_event.response()))  # the echo
        with trio.fail_after(5):
            await closed.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == ["reader"]


async def _raw(
    data: bytes, max_message: int = MAX, gone: list[ClientGone] | None = None
) -> tuple[ServerWebSocket | None, bytes]:
    """What the server answers to raw bytes sent right after its handshake (if ``data`` is an
    upgrade request) or instead of one; ``gone`` gets how the server's read ended."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    answer = b""
    async with trio.open_nursery() as nursery:
        result: list[Any] = []

        async def serve() -> None:
            ws = await accept(server_stream, max_message=max_message, timeout_s=5, send_timeout_s=5)
            result.append(ws)
            if ws is not None:
                with pytest.raises(ClientGone) as ended:
                    await ws.get_message()
                if gone is not None:
                    gone.append(ended.value)
            await server_stream.aclose()

        nursery.start_soon(serve)
        await client_stream.send_all(data)
        with trio.fail_after(10):
            while chunk := await client_stream.receive_some():
                answer += chunk
    return result[0], answer


HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: k\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_a_plain_http_request_is_answered_400_and_nothing_else() -> None:
    ws, answer = await _raw(b"GET / HTTP/1.1\r\nHost: k\r\n\r\n")
    assert ws is None
    assert answer.startswith(b"HTTP/1.1 400 ")


@pytest.mark.parametrize(
    "request_bytes",
    [
        HANDSHAKE.replace(b"HTTP/1.1", b"HTTP/1.0"),  # RFC 6455 4.2.1: HTTP/1.1 or later
        HANDSHAKE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"abc"),  # not 16 bytes in base64
        HANDSHAKE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"!!!!"),  # not base64
    ],
)
async def test_a_handshake_wsproto_would_let_through_is_answered_400(request_bytes: bytes) -> None:
    ws, answer = await _raw(request_bytes)
    assert ws is None
    assert b" 400 " in answer.split(b"\r\n", 1)[0]


async def test_an_unmasked_frame_gets_a_close_frame_with_1002() -> None:
    # Clients must mask their frames (RFC 6455 5.1): this text frame "hi" is not masked.
    gone: list[ClientGone] = []
    ws, answer = await _raw(HANDSHAKE + b"\x81\x02hi", gone=gone)
    assert ws is not None
    assert b" 101 " in answer.split(b"\r\n", 1)[0]
    frames = answer.split(b"\r\n\r\n", 1)[1]
    assert frames[0] == 0x88  # a close frame
    assert int.from_bytes(frames[2:4], "big") == 1002
    # A client that broke the protocol is gone for good: its session ends, never waits for a
    # resume (its jobs were decoded for nobody).
    assert [e.said_goodbye for e in gone] == [True]


async def test_invalid_utf8_text_gets_a_close_frame_with_1007() -> None:
    mask = b"\0\0\0\0"  # a zero mask leaves the payload as it is
    gone: list[ClientGone] = []
    ws, answer = await _raw(HANDSHAKE + b"\x81\x82" + mask + b"\xc3\x28", gone=gone)
    assert ws is not None
    frames = answer.split(b"\r\n\r\n", 1)[1]
    assert frames[0] == 0x88
    assert int.from_bytes(frames[2:4], "big") == 1007
    assert [e.said_goodbye for e in gone] == [True]


async def test_a_client_that_says_nothing_is_let_go_at_the_handshake_timeout(
    autojump_clock: Any,
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(60):
        assert await accept(server_stream, max_message=MAX, timeout_s=10, send_timeout_s=5) is None
    await client_stream.aclose()


async def test_a_close_from_a_client_that_breaks_off_is_not_waited_for() -> None:
    async with pair() as (server, client):
        await client.send_message("x")
        assert await server.get_message() == "x"
        await trio.aclose_forcefully(server.stream)
        with pytest.raises(ClientGone):
            await server.send_message("lost")
        with trio.fail_after(5):  # nothing to read, nothing to wait for: returns at once
            await server.aclose(1000)
        assert not server.open


async def test_a_client_that_pings_and_never_reads_is_let_go_at_the_send_timeout(
    autojump_clock: Any,
) -> None:
    async with raw_pair(lockstep=True, send_timeout_s=10.0) as (server, client_stream, peer):
        pings = b"".join(peer.send(Ping(b"p" * 125)) for _ in range(60))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_stream.send_all, pings)
            started = trio.current_time()
            # One pong for the read's 60 pings, which the client never takes: gone after the
            # send timeout (it was 5 s per ping, shielded, and then the next read's pings).
            with trio.fail_after(60), pytest.raises(ClientGone):
                await server.get_message()
            assert trio.current_time() - started == pytest.approx(10.0, abs=0.5)
            assert not server.open


async def test_a_reader_answering_a_ping_can_be_cancelled(autojump_clock: Any) -> None:
    pair = raw_pair(lockstep=True, send_timeout_s=1000.0)
    async with pair as (server, client_stream, peer), trio.open_nursery() as nursery:
        nursery.start_soon(client_stream.send_all, peer.send(Ping(b"p")))
        started = trio.current_time()
        with trio.move_on_after(3) as scope:  # a session's deadline, or shutdown
            await server.get_message()
        assert scope.cancelled_caught
        assert trio.current_time() - started == pytest.approx(3.0, abs=0.5)
        nursery.cancel_scope.cancel()


async def test_a_send_cut_off_part_way_ends_the_connection(autojump_clock: Any) -> None:
    async with raw_pair(lockstep=True) as (server, client_stream, _peer):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_message, b"x" * 100_000)
            await trio.testing.wait_all_tasks_blocked()
            head = await client_stream.receive_some(1000)  # part of the frame, then no more
            assert 0 < len(head) < 100_000
            nursery.cancel_scope.cancel()  # the writer's timeout, say
        # Anything framed now would follow half a frame: nothing is sent, the client is gone.
        assert not server.open
        with pytest.raises(ClientGone):
            await server.send_message('{"type": "error"}')
        with pytest.raises(ClientGone):
            await server.get_message()


async def test_a_text_message_is_bounded_in_bytes_not_characters() -> None:
    async with pair(max_message=10_000) as (server, client), trio.open_nursery() as nursery:
        nursery.start_soon(client.send_message, "€" * 4000)  # 4,000 characters, 12,000 bytes
        with pytest.raises(MessageTooLarge):
            await server.get_message()
        nursery.cancel_scope.cancel()


async def test_a_message_in_one_byte_fragments_is_held_as_its_bytes() -> None:
    n = 50_000
    async with raw_pair() as (server, client_stream, peer):
        frames = b"".join(peer.send(BytesMessage(b"z", message_finished=False)) for _ in range(n))
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_stream.send_all, frames)
                nursery.start_soon(server.get_message)
                # Every fragment read (the reader waits for more), the message still open.
                with trio.fail_after(30):
                    await trio.testing.wait_all_tasks_blocked()
                held = tracemalloc.get_traced_memory()[0] - before
                nursery.cancel_scope.cancel()
        finally:
            tracemalloc.stop()
        # Held: the message's bytes, and what the in-memory stream kept of the 7-byte frames
        # (~7 per byte); as a list of 1-byte objects it was ~40 more bytes of heap per byte.
        assert held < 12 * n
        await client_stream.send_all(peer.send(BytesMessage(b"!")))
        assert await server.get_message() == b"z" * n + b"!"
        await client_stream.send_all(
            peer.send(TextMessage("é", message_finished=False)) + peer.send(TextMessage("€"))
        )
        assert await server.get_message() == "é€"


def test_wsproto_s_event_queue_is_a_list_and_still_works() -> None:
    # The one event wsproto queues there: the abnormal closure when the stream ends.
    conn = lightened(Connection(ConnectionType.SERVER))
    queue = conn._events
    assert type(queue) is not deque
    assert sys.getsizeof(queue) < sys.getsizeof(deque())
    conn.receive_data(None)
    events = list(conn.events())
    assert [type(e) for e in events] == [CloseConnection]
    assert isinstance(events[0], CloseConnection)
    assert events[0].code == CloseReason.ABNORMAL_CLOSURE


@asynccontextmanager
async def socket_pair(
    *, tcp: bool = False
) -> AsyncIterator[tuple[ServerWebSocket, trio.SocketStream, WSConnection]]:
    """An accepted server side over real sockets (its reads are the gateway's own,
    ``_read_socket``), the client's stream and wsproto's client state."""
    if tcp:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        client = await trio.open_tcp_stream(*listener.socket.getsockname()[:2])
        server = await listener.accept()
        await listener.aclose()
    else:
        ours, theirs = trio.socket.socketpair()
        client, server = trio.SocketStream(theirs), trio.SocketStream(ours)
    peer = WSConnection(ConnectionType.CLIENT)
    async with client, server:
        await client.send_all(peer.send(Request(host="katydid.test", target="/")))
        ws = await accept(server, max_message=MAX, timeout_s=5, send_timeout_s=5)
        assert ws is not None
        peer.receive_data(bytes(await client.receive_some()))
        yield ws, client, peer


async def test_messages_over_a_socket_whatever_the_reads_cut() -> None:
    async with socket_pair() as (ws, client, peer):
        wire = peer.send(BytesMessage(b"u" * 40_000)) + peer.send(TextMessage("stop"))
        for i in range(0, len(wire), 5_000):
            await client.send_all(wire[i : i + 5_000])
        pieces: list[Piece] = []
        while not pieces or not pieces[-1].last:
            piece = await ws.get_message(pieces=True)
            assert isinstance(piece, Piece)
            pieces.append(piece)
        assert b"".join(p.data for p in pieces) == b"u" * 40_000
        assert all(len(p.data) <= 16 * 1024 for p in pieces)
        assert await ws.get_message() == "stop"


async def test_a_socket_reset_by_the_peer_is_a_client_gone() -> None:
    async with socket_pair(tcp=True) as (ws, client, _peer):
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await client.aclose()  # linger 0: a reset, not a close
        with pytest.raises(ClientGone), trio.fail_after(5):
            await ws.get_message()


async def test_a_socket_closed_here_while_its_reader_waits_ends_the_read() -> None:
    # The session ends (its stream closed by the connection's own cleanup) while the reader
    # waits: the read ends at once, and never reads a descriptor number reused since.
    async with socket_pair() as (ws, _client, _peer), trio.open_nursery() as nursery:
        gone = trio.Event()

        async def reader() -> None:
            with pytest.raises(ClientGone):
                await ws.get_message()
            gone.set()

        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await ws.stream.aclose()
        with trio.fail_after(5):
            await gone.wait()


async def test_a_send_cancelled_before_a_byte_went_out_leaves_the_connection_whole() -> None:
    # At shutdown every session is cancelled; a writer that had just been handed the send lock
    # broke its connection though nothing of its frame was sent, and the session's last words
    # (the error, the close frame) never went out: its client saw 1006.
    async with socket_pair() as (ws, client, peer), trio.open_nursery() as nursery:
        await ws._send_lock.acquire()  # another send holds the lock
        scope = trio.CancelScope()

        async def writer() -> None:
            with scope:
                await ws.send_message("never sent")

        nursery.start_soon(writer)
        await trio.testing.wait_all_tasks_blocked()  # waiting for the lock
        ws._send_lock.release()  # handed to the writer, which has not run yet
        scope.cancel()  # the shutdown's cancel comes before it runs
        await trio.testing.wait_all_tasks_blocked()
        assert scope.cancelled_caught
        assert ws.open
        await ws.send_message("last words")
        peer.receive_data(bytes(await client.receive_some()))
        assert [e.data for e in peer.events() if isinstance(e, TextMessage)] == ["last words"]


async def test_a_writer_that_finds_the_client_saying_goodbye_reports_the_goodbye() -> None:
    # The reader has the client's close (1000) and is sending its echo, which waits for the
    # client to read it; a writer that sends meanwhile finds the connection closing. Both must
    # say the client said goodbye: with the writer's bare "gone" the session was kept for a
    # resume that never comes, its jobs left in the queue (seen under load in CI).
    async with raw_pair(lockstep=True) as (server, client_stream, peer):
        gone: list[ClientGone] = []

        async def read() -> None:
            try:
                await server.get_message()
            except ClientGone as exc:
                gone.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_stream.send_all, peer.send(CloseConnection(1000)))
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()  # the echo waits for the client
                assert not server.open
                with pytest.raises(ClientGone) as writer:
                    await server.send_message('{"type": "queued"}')
                assert writer.value.said_goodbye
                peer.receive_data(bytes(await client_stream.receive_some()))
        assert [e.said_goodbye for e in gone] == [True]
        assert [type(e) for e in peer.events()] == [CloseConnection]
