"""client.connect against in-process servers: what callers catch is what happened, not a group."""

from __future__ import annotations

import pytest
import trio
from trio_websocket import WebSocketRequest, serve_websocket

from katydid import client


async def test_a_server_that_is_not_websocket_is_a_handshake_failure(
    nursery: trio.Nursery,
) -> None:
    async def not_http(stream: trio.SocketStream) -> None:
        await stream.send_all(b"NOT HTTP\r\n\r\n")
        await stream.aclose()

    listeners = await nursery.start(trio.serve_tcp, not_http, 0)
    port = listeners[0].socket.getsockname()[1]
    with pytest.raises(client.ClientError) as caught:
        async with client.connect(f"ws://127.0.0.1:{port}/", connect_timeout_s=5):
            pass
    assert caught.value.kind == "handshake_failed"


async def test_what_the_callers_block_raises_comes_out_as_itself(nursery: trio.Nursery) -> None:
    async def handler(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await trio.sleep_forever()  # holds the connection open
        await ws.aclose()

    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)

    async def wait_for_a_message() -> None:
        async with client.connect(f"ws://127.0.0.1:{server.port}/", connect_timeout_s=5) as ws:
            with trio.fail_after(0.2):
                await ws.get_message()  # the server never sends

    with pytest.raises(trio.TooSlowError):
        await wait_for_a_message()
