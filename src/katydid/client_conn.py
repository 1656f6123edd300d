"""The client's connection and what it gathers: ``ClientError``, ``SessionResult``, and
``connect`` / ``open_link`` (a protocol v1 WebSocket, and for ``open_link`` a way to cut its TCP
connection as a network would: the load tester's ``--drop-rate`` and the resume tests).

``katydid.client`` re-exports all of it; the session itself (resume included) is there.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import trio
from trio_websocket import HandshakeError, WebSocketConnection, wrap_client_stream

from katydid.errors import KatydidError


class ClientError(KatydidError):
    """The server could not be reached, or the session did not finish in time.

    ``kind`` says which: ``bad_url``, ``connect_refused``, ``connect_failed``,
    ``connect_timeout``, ``handshake_timeout``, ``handshake_failed``, ``session_timeout``; and
    when a lost connection could not be resumed: ``reconnect_failed`` (no server within
    ``reconnect_s``), ``resume_expired``, ``unauthorized``, ``session_taken``, ``resume_gap``
    (the server needs audio older than the client kept), ``resume_failed`` (an answer that is
    not ``resumed``). ``result`` then holds what the session had delivered before.
    """

    def __init__(self, kind: str, message: str, result: SessionResult | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.result = result


@dataclass(slots=True)
class SessionResult:
    session_id: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    connect_s: float = 0.0
    total_s: float = 0.0
    first_final_s: float | None = None
    close_code: int | None = None
    # Resumption: connections resumed, reconnect attempts made, server events dropped as
    # duplicates (a final or chunk error whose seq had been delivered) or seen out of order; for
    # each resume the time from opening the connection that resumed (the client's backoff
    # excluded) to the first result after it (a partial, final, chunk error or done), and for
    # each outage the time from the loss to the next final (backoff and the speaker's
    # unfinished utterance included: for scale).
    resumes: int = 0
    reconnect_attempts: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    resume_latencies_s: list[float] = field(default_factory=list)
    resume_first_kinds: list[str] = field(default_factory=list)  # what that first result was
    outage_to_final_s: list[float] = field(default_factory=list)

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == "final"]

    @property
    def text(self) -> str:
        return " ".join(f["text"] for f in self.finals if f.get("text")).strip()

    @property
    def done(self) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("type") == "done"), None)

    @property
    def error(self) -> dict[str, Any] | None:
        """The error that ended the session, if one did: one before a ``resumed`` (a gateway
        shutting down, say) was survived."""
        last = max((i for i, e in enumerate(self.events) if e.get("type") == "resumed"), default=-1)
        after = self.events[last + 1 :]
        return next((e for e in after if e.get("type") == "error" and "seq" not in e), None)

    @property
    def queued(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == "queued"]

    @property
    def lost_seqs(self) -> list[int]:
        """Chunks ``done`` counted that got neither a final nor a chunk error here (empty
        before ``done``): each chunk's seq is answered once, in order, across resumes."""
        done = self.done
        if done is None:
            return []
        seen = {e["seq"] for e in self.events if e.get("type") in ("final", "error") and "seq" in e}
        # No final for a chunk with no words: ``done.silent`` names those since the last
        # resume; before it, results came in order, so any seq under the resume's after_seq
        # without a final was one (the server had passed it).
        seen |= {int(seq) for seq in done.get("silent") or ()}
        settled = max(
            (int(e.get("after_seq", -1)) for e in self.events if e.get("type") == "resumed"),
            default=-1,
        )
        chunks = int(done.get("chunks", 0))
        return [seq for seq in range(settled + 1, chunks) if seq not in seen]


@dataclass(slots=True)
class Link:
    """An open connection: the WebSocket and the TCP stream under it."""

    ws: WebSocketConnection
    stream: trio.abc.Stream

    async def abort(self) -> None:
        """Cut the TCP connection with a reset and no close frame, as a failing network or a
        killed process would (SO_LINGER 0 makes close send RST): the server must take the
        session as detached, not ended."""
        raw = self.stream
        if isinstance(raw, trio.SSLStream):
            raw = raw.transport_stream
        if isinstance(raw, trio.SocketStream):
            raw.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.aclose()


@asynccontextmanager
async def connect(
    url: str, *, connect_timeout_s: float = 10.0
) -> AsyncIterator[WebSocketConnection]:
    """Open a protocol v1 WebSocket to ``url`` (``ws://`` or ``wss://``).

    Raises:
        ClientError: the server cannot be reached or refuses the handshake.
    """
    async with open_link(url, connect_timeout_s=connect_timeout_s) as link:
        yield link.ws


@asynccontextmanager
async def open_link(url: str, *, connect_timeout_s: float = 10.0) -> AsyncIterator[Link]:
    """``connect``, yielding the ``Link`` (for a caller that may need to cut it).

    Raises:
        ClientError: the server cannot be reached or refuses the handshake.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ClientError("bad_url", f"not a ws:// or wss:// URL: {url}")
    host = parts.hostname
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        with trio.fail_after(connect_timeout_s):
            if parts.scheme == "wss":
                ctx = ssl.create_default_context()
                stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=ctx
                )
            else:
                stream = await trio.open_tcp_stream(host, port)
    except ConnectionRefusedError as exc:
        raise ClientError("connect_refused", f"cannot connect to {url}: {exc!r}") from exc
    except OSError as exc:
        raise ClientError("connect_failed", f"cannot connect to {url}: {exc!r}") from exc
    except trio.TooSlowError as exc:
        raise ClientError(
            "connect_timeout", f"no TCP connection to {url} within {connect_timeout_s:.0f} s"
        ) from exc
    # We own the TCP stream: trio-websocket's client does not close its socket after a clean
    # close handshake (its reader stops at EOF without closing), so `async with stream` does.
    handshaken = False
    try:
        async with stream, trio.open_nursery() as nursery:
            watched = _HandshakeWatch(stream)
            handshake = watched.scope = trio.CancelScope()
            try:
                with trio.fail_after(connect_timeout_s):
                    with handshake:
                        ws = await wrap_client_stream(nursery, watched, host, resource)  # type: ignore[arg-type]
                    if handshake.cancelled_caught:
                        raise ClientError(
                            "handshake_failed",
                            f"WebSocket handshake with {url} failed: the server cut the connection",
                        )
            except trio.TooSlowError as exc:
                raise ClientError(
                    "handshake_timeout",
                    f"no WebSocket handshake with {url} within {connect_timeout_s:.0f} s",
                ) from exc
            except (HandshakeError, trio.BrokenResourceError) as exc:
                raise ClientError(
                    "handshake_failed", f"WebSocket handshake with {url} failed: {exc!r}"
                ) from exc
            handshaken = True
            watched.scope = None
            try:
                yield Link(ws, stream)
            finally:
                with trio.move_on_after(2) as cleanup:
                    cleanup.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery runs only trio-websocket's reader, yet wraps what the handshake or the
        # caller's block raised in a group: hand a lone exception on as itself, so that callers
        # catch the ClientError or deadline they expect.
        if len(group.exceptions) != 1:
            raise
        lone = group.exceptions[0]
        if not handshaken and isinstance(lone, Exception) and not isinstance(lone, ClientError):
            # The reader task choked on what the server answered (not a WebSocket server).
            raise ClientError(
                "handshake_failed", f"WebSocket handshake with {url} failed: {lone!r}"
            ) from lone
        raise lone from lone.__cause__


class _HandshakeWatch(trio.abc.Stream):
    """The TCP stream as trio-websocket uses it, watched during the handshake: its reader task,
    meeting a reset or EOF there (sending the request or reading the answer), ends without
    waking the handshake, which then waits out the whole connect timeout (a gateway restarting
    would cost each reconnect attempt that much). Here the end cancels the handshake at once."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.scope: trio.CancelScope | None = None  # the handshake's, while it runs

    def _ended(self) -> None:
        if self.scope is not None:
            self.scope.cancel()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._ended()
            raise
        if not data:
            self._ended()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.inner.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._ended()  # the reader sends the handshake, and stops if that fails
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self.inner.aclose()
