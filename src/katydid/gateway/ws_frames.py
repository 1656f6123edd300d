"""trio-websocket at the edge of the WebSocket doors: its exceptions become ``ClientGone``."""

from __future__ import annotations

from trio_websocket import ConnectionClosed, WebSocketConnection

from katydid.gateway.driver import ClientGone


async def receive(ws: WebSocketConnection) -> str | bytes:
    """The next frame.

    Raises:
        ClientGone: the connection closed (``too_large``: trio-websocket closed it with 1009
            for a frame past its own limit).
    """
    try:
        return await ws.get_message()
    except ConnectionClosed as exc:
        raise ClientGone(too_large=getattr(exc.reason, "code", None) == 1009) from None
