"""A small client for protocol v1 (used by ``katydid transcribe --url``, tests and the load tester).

Two ways to send: a container file as-is (the gateway decodes it), or raw ``pcm_s16le`` frames,
as fast as allowed or paced in real time like a microphone. Receiving runs concurrently with
sending, so queue updates and finals arrive while audio is still going out.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionClosed,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

from katydid.errors import KatydidError


class ClientError(KatydidError):
    """The server could not be reached, or the session did not finish in time.

    ``kind`` says which: ``bad_url``, ``connect_refused``, ``connect_failed``,
    ``connect_timeout``, ``handshake_timeout``, ``handshake_failed``, ``session_timeout``.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(slots=True)
class SessionResult:
    session_id: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    connect_s: float = 0.0
    total_s: float = 0.0
    first_final_s: float | None = None
    close_code: int | None = None

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
        return next((e for e in self.events if e.get("type") == "error" and "seq" not in e), None)

    @property
    def queued(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("type") == "queued"]


@asynccontextmanager
async def connect(
    url: str, *, connect_timeout_s: float = 10.0
) -> AsyncIterator[WebSocketConnection]:
    """Open a protocol v1 WebSocket to ``url`` (``ws://`` or ``wss://``).

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
            try:
                with trio.fail_after(connect_timeout_s):
                    ws = await wrap_client_stream(nursery, stream, host, resource)  # type: ignore[arg-type]
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
            try:
                yield ws
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


async def transcribe(
    url: str,
    audio: bytes,
    *,
    fmt: str = "pcm_s16le",
    sample_rate: int = 16_000,
    channels: int = 1,
    frame_bytes: int = 3200,
    realtime: bool = False,
    options: dict[str, Any] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    connect_timeout_s: float = 10.0,
    session_timeout_s: float = 900.0,
    send_stop: bool = True,
) -> SessionResult:
    """Run one session: start, audio frames, stop; collect events until ``done`` or close.

    Args:
        url: ``ws://host:port``.
        audio: PCM bytes (``fmt="pcm_s16le"``) or a whole container file.
        frame_bytes: bytes per binary frame (3200 = 100 ms of 16 kHz mono PCM).
        realtime: pace PCM frames at their duration, like a microphone.
        options: extra ``start`` fields (language, partials, max_wait_s, ...).
        on_event: called with each server event as it arrives.
        send_stop: False leaves the stream open (for tests of abandoned sessions).

    Raises:
        ClientError: connect or handshake failure, or the session timed out.
    """
    result = SessionResult()
    started = time.monotonic()
    start = {
        "type": "start",
        "format": fmt,
        "sample_rate": sample_rate,
        "channels": channels,
        **(options or {}),
    }
    bytes_per_s = 2 * channels * sample_rate

    async def sender(ws: WebSocketConnection) -> None:
        await ws.send_message(json.dumps(start))
        t0 = trio.current_time()
        sent = 0
        for i in range(0, len(audio), frame_bytes):
            frame = audio[i : i + frame_bytes]
            await ws.send_message(frame)
            sent += len(frame)
            if realtime and fmt == "pcm_s16le":
                await trio.sleep_until(t0 + sent / bytes_per_s)
        if send_stop:
            await ws.send_message(json.dumps({"type": "stop"}))

    async def receiver(ws: WebSocketConnection) -> None:
        while True:
            try:
                raw = await ws.get_message()
            except ConnectionClosed as exc:
                result.close_code = exc.reason.code if exc.reason else None
                return
            event = json.loads(raw)
            result.events.append(event)
            kind = event.get("type")
            if kind == "ready":
                result.session_id = event.get("session_id", "")
            elif kind == "final" and result.first_final_s is None:
                result.first_final_s = time.monotonic() - started
            if on_event is not None:
                on_event(event)
            if kind == "done":
                return

    try:
        async with connect(url, connect_timeout_s=connect_timeout_s) as ws:
            result.connect_s = time.monotonic() - started
            with trio.fail_after(session_timeout_s):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_guard_closed, sender, ws)
                    await receiver(ws)
                    nursery.cancel_scope.cancel()
    except trio.TooSlowError as exc:
        raise ClientError(
            "session_timeout", f"session did not finish within {session_timeout_s:.0f} s"
        ) from exc
    result.total_s = time.monotonic() - started
    return result


async def _guard_closed(fn: Callable[[WebSocketConnection], Any], ws: WebSocketConnection) -> None:
    # The server may close mid-send (an error event explains why): the receiver reports it.
    try:
        await fn(ws)
    except ConnectionClosed:
        pass
