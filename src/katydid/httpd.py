"""The HTTP server: hypercorn's trio worker serving an ASGI app (``katydid.gateway.http``).

hypercorn because it runs on trio natively (the gateway's event loop, no second loop or thread)
and is maintained (HTTP/1.1 and h2, keep-alive, bounded header sizes, graceful close).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer

from katydid.errors import listening


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"


def json_response(status: int, payload: object) -> Response:
    return Response(status, json.dumps(payload).encode() + b"\n")


async def serve_http(
    app: Any,
    host: str,
    port: int,
    *,
    tls: tuple[str, str] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on ``host:port`` until cancelled (``tls``: certificate and key files);
    ``started`` gets the bound port."""
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None  # a line per request would be a log storm; the metrics count them
    config.errorlog = logging.getLogger("katydid.http")
    config.graceful_timeout = 2.0
    if tls is not None:
        config.certfile, config.keyfile = tls
    _tolerate_send_during_close()
    async with trio.open_nursery() as nursery:
        with listening("HTTP door", host, port):
            binds: list[str] = await nursery.start(functools.partial(serve, app, config))
        task_status.started(int(binds[0].rsplit(":", 1)[1]))


def _tolerate_send_during_close() -> None:
    """A send that meets the connection being closed is dropped, as hypercorn drops one that
    meets a broken connection, instead of ending the server.

    hypercorn (0.18.0) sends under a lock but closes (``send_eof``) outside it. A client that
    declares a huge body and hangs up while the door answers 413 has hypercorn closing the
    connection in one task while another sends (the door's answer, or hypercorn's own error
    response for the cut-off body): trio raises ``BusyResourceError``, which hypercorn does not
    catch, and it left hypercorn's nursery and ended the whole server (once in ~30 tries; AMD
    EPYC, 2 cores).
    """
    original = TCPServer.protocol_send
    if getattr(original, "tolerates_close", False):
        return

    async def protocol_send(self: TCPServer, event: Event) -> None:
        try:
            await original(self, event)
        except trio.BusyResourceError:
            await self.protocol.handle(Closed())

    protocol_send.tolerates_close = True  # type: ignore[attr-defined]
    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
