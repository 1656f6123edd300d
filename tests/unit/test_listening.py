"""The accept loop: a storm's connections are taken when the listener wakes, not one per pass."""

from __future__ import annotations

import socket

import structlog
import trio
import trio.testing

from katydid.gateway.listening import accept_forever
from katydid.log import SampledLogger

WAITING = 200  # below every kernel's default accept queue (somaxconn: 4,096; 128 before 5.4)


async def test_connections_waiting_in_the_kernel_are_taken_in_a_few_passes() -> None:
    """200 connections wait in the accept queue; the accept loop takes all of them within a few
    scheduler passes (counted by a task that yields once a pass). trio's own ``accept`` takes
    one a pass: 200 passes, while in a storm each pass runs thousands of tasks."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(WAITING)]
    served: list[int] = []
    passes = 0

    async def handler(stream: trio.SocketStream) -> None:
        served.append(passes)
        await stream.aclose()

    async def count_passes() -> None:
        nonlocal passes
        while True:
            passes += 1
            await trio.lowlevel.checkpoint()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(count_passes)
            nursery.start_soon(
                accept_forever, listener, nursery, handler, SampledLogger(structlog.get_logger())
            )
            with trio.fail_after(10):
                while len(served) < WAITING:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        for c in clients:
            c.close()
    assert served[-1] - served[0] <= 3, (served[0], served[-1])


async def test_the_port_stops_listening_when_the_accept_loop_ends() -> None:
    """The loop's second handle on the listening socket is closed with it: a port that went on
    listening would take clients that nobody ever accepts (with SO_REUSEPORT, clients the other
    gateways should have had)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            accept_forever,
            listener,
            nursery,
            trio.SocketStream.aclose,
            SampledLogger(structlog.get_logger()),
        )
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    probe = socket.socket()
    try:
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    finally:
        probe.close()
