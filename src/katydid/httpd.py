"""A tiny HTTP/1.1 endpoint for operators: ``/metrics``, ``/healthz``, ``/readyz`` (h11 over trio).

Rule 1: one request per connection, bounded in size and time (``Connection: close``); this
endpoint is for Prometheus and load balancers, not for clients.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import h11
import trio

MAX_REQUEST_BYTES = 16 * 1024
REQUEST_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"


Route = Callable[[], Response]


def json_response(status: int, payload: object) -> Response:
    return Response(status, json.dumps(payload).encode() + b"\n")


async def _serve_one(stream: trio.abc.Stream, routes: dict[str, Route]) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    with trio.move_on_after(REQUEST_TIMEOUT_S):
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = bytes(await stream.receive_some(4096))
                    conn.receive_data(data)
                    if not data:
                        return
                    continue
                if isinstance(event, h11.Request):
                    path = event.target.decode("ascii", "replace").split("?", 1)[0]
                    route = routes.get(path)
                    resp = route() if route else json_response(404, {"error": "not found"})
                    headers = [
                        ("content-type", resp.content_type),
                        ("content-length", str(len(resp.body))),
                        ("connection", "close"),
                    ]
                    await stream.send_all(
                        conn.send(h11.Response(status_code=resp.status, headers=headers)) or b""
                    )
                    await stream.send_all(conn.send(h11.Data(data=resp.body)) or b"")
                    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                return
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await trio.aclose_forcefully(stream)


async def serve_http(
    host: str,
    port: int,
    routes: dict[str, Route],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``routes`` until cancelled; ``started`` gets the bound port."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = int(listeners[0].socket.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        await _serve_one(stream, routes)

    async with trio.open_nursery() as nursery:
        task_status.started(bound)
        await trio.serve_listeners(handle, listeners, handler_nursery=nursery)
