"""Ports on this host: free ones to listen on, and waiting until one is listened on."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable

import trio


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1", *, avoid: Iterable[int] = ()) -> list[int]:
    """``n`` distinct free ports, none of ``avoid`` (ports named for others that are not bound
    yet): each socket is held until all are bound, so the kernel cannot hand out one port twice
    (two one-at-a-time picks can coincide, and nats-server then fails to bind its second
    listener)."""
    taken = set(avoid)
    picked: list[int] = []
    with contextlib.ExitStack() as stack:
        while len(picked) < n:
            s = stack.enter_context(socket.socket())
            s.bind((host, 0))
            port = int(s.getsockname()[1])
            if port not in taken:  # else held, so that the next bind gets another
                picked.append(port)
        return picked


async def wait_for_port(port: int, timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.05)
                continue
            # With nothing listening, a connect whose ephemeral source port is ``port`` joins
            # itself (TCP simultaneous open): that is not the server.
            sock = stream.socket
            itself = sock.getsockname() == sock.getpeername()
            await stream.aclose()
            if not itself:
                return
            await trio.sleep(0.05)
