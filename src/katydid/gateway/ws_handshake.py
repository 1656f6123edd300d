"""The WebSocket handshake on the gateway's side: the HTTP upgrade request read, checked and
answered, within a timeout; what it leaves is a ``ServerWebSocket`` (ws_transport.py) holding
no HTTP state.

Rule 1: the request is read a ``RECEIVE_BYTES`` at a time, h11 bounds it at 16 KB; a request
that is not a sound WebSocket handshake is answered with a 4xx and the connection ends.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Event, RejectConnection, Request
from wsproto.utilities import RemoteProtocolError

from katydid.gateway.ws_transport import BROKEN, RECEIVE_BYTES, ServerWebSocket


async def accept(
    stream: trio.abc.Stream,
    *,
    max_message: int,
    timeout_s: float,
    send_timeout_s: float,
) -> ServerWebSocket | None:
    """Read the HTTP upgrade request and accept it, within ``timeout_s``. ``send_timeout_s``
    bounds a pong (a client that does not take one in that time does not read).

    Returns:
        The connection, or None if the peer left, timed out, or sent something other than a
        WebSocket handshake (answered with a 4xx).
    """
    ws = WSConnection(ConnectionType.SERVER)
    with trio.move_on_after(timeout_s):
        try:
            while True:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    return None
                try:
                    ws.receive_data(bytes(data))
                    request = _request(ws.events())
                except RemoteProtocolError as exc:
                    await stream.send_all(ws.send(exc.event_hint or RejectConnection()))
                    return None
                if request is not None and not _sound(ws, request):
                    await stream.send_all(ws.send(RejectConnection()))  # 400
                    return None
                if request is not None:
                    await stream.send_all(ws.send(AcceptConnection()))
                    # Only the WebSocket state stays: the handshake's HTTP state goes now,
                    # with the frames a client sent before our answer (wsproto leaves them in
                    # h11's buffer).
                    assert ws.connection is not None
                    ws.connection.receive_data(_early_frames(ws))
                    return ServerWebSocket(
                        stream, ws.connection, request, max_message, send_timeout_s
                    )
        except BROKEN:
            return None
    return None


def _sound(ws: WSConnection, request: Request) -> bool:
    """What wsproto lets through and RFC 6455 4.2.1 does not: HTTP/1.1 or later, and a
    Sec-WebSocket-Key that is 16 bytes in base64."""
    version = getattr(_h11(ws), "their_http_version", None)
    if version is not None and version < b"1.1":
        return False
    key = next((v for k, v in request.extra_headers if k == b"sec-websocket-key"), b"")
    try:
        return len(base64.b64decode(bytes(key).strip(), validate=True)) == 16
    except ValueError:
        return False


def _h11(ws: WSConnection) -> object:
    """The handshake's h11 connection (wsproto exposes no accessor; None if it changes)."""
    return getattr(ws.handshake, "_h11_connection", None)


def _early_frames(ws: WSConnection) -> bytes:
    trailing = getattr(_h11(ws), "trailing_data", (b"", False))
    return bytes(trailing[0])


def _request(events: Iterable[Event]) -> Request | None:
    return next((e for e in events if isinstance(e, Request)), None)
