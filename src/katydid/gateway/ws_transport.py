"""The server side of a WebSocket, on wsproto, with no task of its own.

trio-websocket gives every connection a reader task, a message channel and the handshake's HTTP
state for the connection's whole life: about 12 KB of Python objects per connection, a third of
what a session waiting in the queue held. Here the connection's own task reads (a door's reader
calls ``get_message``), the HTTP state is dropped once the handshake is done, and what a
message is built from lives on this object, so a read cancelled by the session's deadline
loses nothing.

Errors are mapped here, at the edge: a peer that closes, resets or breaks the protocol is
``ClientGone`` (after the close frame the protocol asks for: 1002 or 1007 for a protocol error,
the echo of the client's own close); a message over ``max_message`` bytes is ``MessageTooLarge``
(the door answers ``too_large`` and closes with 1009).

Rule 1: every read is at most ``RECEIVE_BYTES``, a message at most ``max_message`` bytes (text
counted in UTF-8 bytes, as it arrives, never held past the bound, in one buffer whatever its
fragments), the HTTP request at h11's 16 KB.
Rule 2: sends are serialised by one lock (the reader's pongs and the writer's events share the
stream); a send never waits for a read. A frame goes out whole or the connection is over: a
send cut off part-way (a timeout, a cancel) breaks it, and nothing is framed after it.
Rule 3: a read's pings get one pong (the latest's), bounded by the send timeout and never
shielded: a client that pings and does not read is gone after it, and a cancel (the session's
deadline, shutdown) ends a reader that is answering.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Literal, overload

import trio
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from katydid.errors import ClientGone
from katydid.gateway.wsproto_fit import lightened, nothing_buffered

# Under the gateway's mmap threshold (``heap.py``): a read's buffer comes from the heap and is
# shrunk in place, where a larger one would be mapped and unmapped on every read.
RECEIVE_BYTES = 16 * 1024
BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


@dataclass(frozen=True, slots=True)
class Piece:
    """Part of a binary message, handed on as it arrives (``get_message(pieces=True)``): an
    upload's bytes go to its spooled file a read at a time instead of being held whole first
    (10,000 clients uploading at once, each with a message half in: 64 KB apiece).
    ``size``: the message's bytes so far, this piece's included; ``last``: it ends the message."""

    data: bytes
    size: int
    last: bool


class MessageTooLarge(Exception):
    """A message grew past the connection's bound; ``limit``: that bound, in bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"message of more than {limit} bytes")
        self.limit = limit


class ServerWebSocket:
    """One accepted WebSocket: ``get_message``, ``send_message``, ``aclose``; ``path`` and
    ``headers`` are the handshake request's."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: Connection,
        request: Request,
        max_message: int,
        send_timeout_s: float,
    ) -> None:
        self.stream = stream
        self.path: str = request.target
        # Read once, by the door; ``forget_headers`` then drops them (1-2 KB a connection).
        self.headers: tuple[tuple[bytes, bytes], ...] = tuple(
            (bytes(k), bytes(v)) for k, v in request.extra_headers
        )
        self._conn = lightened(connection)
        self._max = max_message
        self._send_timeout_s = send_timeout_s
        self._send_lock = trio.StrictFIFOLock()
        # The message being received, as bytes (a text message's UTF-8): one buffer whatever
        # the fragments (a list of 1-byte fragments cost ~28 bytes of heap per byte), and a
        # size in bytes for the bound, whatever the characters.
        self._buffer = bytearray()
        self._size = 0
        self._pong: Ping | None = None  # the latest ping not yet answered (RFC 6455 5.5.3)
        self._reading = False  # a task is reading (get_message, or aclose): one at a time
        # A send cut off part-way (cancelled, timed out) may have left half a frame on the
        # wire: nothing more can be framed after it, so the connection is over.
        self._broken = False
        # The close handshake is over, or the peer is gone; an event only for a task that
        # waits for it (an Event is ~500 bytes, held by every waiting session).
        self._closed = False
        self._closed_event: trio.Event | None = None
        # The client gave its session up: its close frame said 1000, or it broke the protocol
        # (``_closing``). Set before the echo is sent: a writer that finds the connection
        # closing meanwhile must report the same, or the session would wait for a resume that
        # never comes.
        self._said_goodbye = False
        # Every event of what was read has been handled: the next message needs a read (a
        # message returned from the middle of a read may leave more events behind it; frames
        # sent with the handshake are in the connection before the first read).
        self._drained = False

    def forget_headers(self) -> None:
        """The handshake's headers are no longer needed (a session may wait for hours)."""
        self.headers = ()

    @property
    def open(self) -> bool:
        return not self._broken and self._conn.state is ConnectionState.OPEN

    def parkable(self) -> int | None:
        """The socket's descriptor if the next message can only come from reading it (nothing
        of an earlier read left to handle, no read under way, a plain TCP stream), else None:
        a reader may then wait for it to be readable without a read (``parking``)."""
        if not self._drained or self._reading or self._broken or self._pong is not None:
            return None
        if not isinstance(self.stream, trio.SocketStream):
            return None  # TLS: a readable socket need not hold a whole record, nor data
        return self.stream.socket.fileno()

    @overload
    async def get_message(self, *, pieces: Literal[False] = False) -> str | bytes: ...

    @overload
    async def get_message(self, *, pieces: bool) -> str | bytes | Piece: ...

    async def get_message(self, *, pieces: bool = False) -> str | bytes | Piece:
        """The next whole message (text or binary); pings are answered on the way. With
        ``pieces``, a binary message comes as the ``Piece``s it arrives in.

        Raises:
            ClientGone: the peer closed, reset or broke the protocol (answered as it asks).
            MessageTooLarge: the message passed ``max_message`` bytes.
        """
        if self._reading:  # aclose is reading for the client's echo: the connection is ending
            await self._wait_closed()
            raise self._gone()
        self._reading = True
        try:
            while True:
                message = await self._next_event_message(pieces)
                if message is not None:
                    return message
        finally:
            self._reading = False

    async def _next_event_message(self, pieces: bool) -> str | bytes | Piece | None:
        if self._broken:
            raise self._gone()
        message = await self._first_message(pieces)
        # One pong for the pings of a read, not one per ping: a client that pings and never
        # reads cannot hold the reader (and the session, and shutdown) in a send per ping.
        if self._pong is not None:
            await self._answer_ping()
        if message is None:
            await self._receive()
        return message

    async def _first_message(self, pieces: bool) -> str | bytes | Piece | None:
        """The first message among the events of what was read (a function of its own: the
        last event, and its data, up to a read's 16 KB, is not held while the next read waits;
        in a 10,000-client storm on an AMD EPYC with 2 cores, ~1,200 coroutine frames of the
        gateway each held a 16 KB read while waiting)."""
        self._drained = False
        for event in self._conn.events():
            message = await self._handle(event, pieces)
            if message is not None:
                self._drained = nothing_buffered(self._conn)
                return message
        self._drained = True
        return None

    async def _handle(self, event: Event, pieces: bool) -> str | bytes | Piece | None:
        if isinstance(event, (TextMessage, BytesMessage)):
            data = event.data
            # Counted in bytes: 700,000 "€" are 2.1 MB on the wire in 700,000 characters.
            chunk = data.encode("utf-8") if isinstance(data, str) else bytes(data)
            self._size += len(chunk)
            if self._size > self._max:
                self._buffer, self._size = bytearray(), 0
                raise MessageTooLarge(self._max)
            if pieces and isinstance(event, BytesMessage):
                return self._piece(chunk, event.message_finished)
            if not event.message_finished:
                self._buffer += chunk
                return None
            return self._whole(event, chunk)
        if isinstance(event, Ping):
            self._pong = event
            return None
        if isinstance(event, CloseConnection):
            await self._closing(event)
        return None  # a pong, or an event of the handshake

    async def _answer_ping(self) -> None:
        """The latest ping's pong, within the send timeout; a client that does not take it in
        that time does not read, and is gone.

        Raises:
            ClientGone: the pong could not go out.
        """
        assert self._pong is not None
        pong = self._pong.response()
        with trio.move_on_after(self._send_timeout_s):
            await self._send(pong)
            self._pong = None
            return
        self._break()
        raise self._gone()

    def _piece(self, data: bytes, last: bool) -> Piece:
        # What came before in whole messages' mode (a caller that switched mid-message) first.
        if self._buffer:
            data, self._buffer = bytes(self._buffer) + data, bytearray()
        piece = Piece(data, self._size, last)
        if last:
            self._size = 0
        return piece

    def _whole(self, last: TextMessage | BytesMessage, chunk: bytes) -> str | bytes:
        buffer, self._buffer, self._size = self._buffer, bytearray(), 0
        if not buffer:
            return last.data if isinstance(last, TextMessage) else chunk
        buffer += chunk
        # A text message's UTF-8 was checked by wsproto as it came.
        return buffer.decode("utf-8") if isinstance(last, TextMessage) else bytes(buffer)

    def _gone(self) -> ClientGone:
        return ClientGone(said_goodbye=self._said_goodbye)

    def _set_closed(self) -> None:
        self._closed = True
        if self._closed_event is not None:
            self._closed_event.set()

    async def _wait_closed(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        if self._closed_event is None:
            self._closed_event = trio.Event()
        await self._closed_event.wait()

    def _break(self) -> None:
        self._broken = True
        self._set_closed()

    async def _closing(self, event: CloseConnection) -> None:
        """A close frame came in, or wsproto stands for one after a protocol error (the state is
        then still open): answer it, and the connection is over.

        Raises:
            ClientGone: always.
        """
        state = self._conn.state
        # A goodbye: the client closed with 1000, or broke the protocol (wsproto stands for a
        # close then, 1002 or 1007, the state still open): either way its session is over,
        # not to be resumed (protocol.md). A lost connection or another code is not.
        self._said_goodbye = event.code == 1000 or state is ConnectionState.OPEN
        if state is ConnectionState.REMOTE_CLOSING:
            with contextlib.suppress(ClientGone):
                await self._send(event.response())  # the echo the client waits for
        elif state is ConnectionState.OPEN:
            with contextlib.suppress(ClientGone):
                await self._send(CloseConnection(event.code, event.reason))  # 1002, 1007
        self._set_closed()
        raise self._gone()

    async def _receive(self) -> None:
        """Read and hand to wsproto what the client sent (at most ``RECEIVE_BYTES``).

        Raises:
            ClientGone: the peer closed or reset the connection, or sent data after the close
                handshake.
        """
        data: bytes | bytearray
        if isinstance(self.stream, trio.SocketStream):
            data = await _read_socket(self.stream.socket)
        else:
            try:
                data = await self.stream.receive_some(RECEIVE_BYTES)
            except BROKEN:
                data = b""
        if not data:
            self._set_closed()
            raise self._gone()
        try:
            self._conn.receive_data(bytes(data) if isinstance(data, bytearray) else data)
        except RemoteProtocolError:  # data after the close handshake
            self._set_closed()
            raise self._gone() from None

    async def send_message(self, message: str | bytes) -> None:
        """Send one message.

        Raises:
            ClientGone: the connection is closing or gone.
        """
        if not self.open:
            raise self._gone()
        await self._send(
            TextMessage(data=message) if isinstance(message, str) else BytesMessage(data=message)
        )

    async def _send(self, event: Event) -> None:
        """Send one frame whole, or break the connection.

        Raises:
            ClientGone: the connection is broken (now or by an earlier send cut off part-way).
        """
        if self._broken:
            raise self._gone()
        try:
            data = self._conn.send(event)
        except Exception:  # wsproto's LocalProtocolError: the state allows no such send
            raise self._gone() from None
        async with self._send_lock:
            if self._broken:
                raise self._gone()
            # A cancel that came while the lock was being taken (its acquire yields, or hands
            # the lock over to a waiter that runs later) ends the send before a byte of it
            # went out, and the connection stays whole for the session's last words: at a
            # gateway's shutdown every writer that had just taken its lock broke its connection
            # instead, and its client got no error and no close frame (1006).
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                await self.stream.send_all(data)
            except BROKEN:
                self._break()
                raise self._gone() from None
            except BaseException:
                # Cancelled (a timeout, shutdown) while the frame may be part-way out: the
                # client could never read a frame after it (trio: the stream is then broken).
                self._break()
                raise

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Start the close handshake and wait for the client's echo (RFC 6455 7.1.1: closing TCP
        with its frames unread could reset the connection before it reads ours). Bounded by the
        caller; the stream itself is closed by whoever accepted it."""
        if self.open:
            with contextlib.suppress(ClientGone):
                await self._send(CloseConnection(code, reason))
        if self._reading:
            await self._wait_closed()  # the reader sees the echo
            return
        while not self._closed:
            try:
                await self.get_message()  # what the client still sends, dropped
            except ClientGone:
                return
            except MessageTooLarge:
                continue  # the rest of the message that was too large


async def _read_socket(sock: trio.socket.SocketType) -> bytes:
    """A read of a plain TCP socket, its schedule point before it: what was read goes to wsproto
    and is parsed before the task next yields. trio's ``receive_some`` yields after a read that
    did not wait, holding what it read meanwhile, and in a storm (thousands of tasks between
    two turns of one) ~1,100 reads of up to 16 KB each were held so in a gateway of 3,100
    sessions (10,000 clients, AMD EPYC, 2 cores). b"" once the peer closed, reset or the socket
    was closed here."""
    await trio.lowlevel.checkpoint()
    while True:
        fd = sock.fileno()  # -1 once closed: a descriptor number may be reused, never read
        if fd < 0:
            return b""
        try:
            return os.read(fd, RECEIVE_BYTES)
        except BlockingIOError:
            pass
        except OSError:  # reset, or another failure of the connection
            return b""
        try:
            await trio.lowlevel.wait_readable(sock)
        except BROKEN:  # closed by another task while waiting
            return b""
