"""Ports picked for the embedded nats-server and its monitor never coincide, and waiting for
one is not fooled by a connection to itself."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import trio

from katydid.ports import free_ports, wait_for_port


def test_ports_picked_together_are_distinct_and_bindable() -> None:
    for _ in range(50):
        ports = free_ports(3)
        assert len(set(ports)) == 3
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", ports[0]))
        b.bind(("127.0.0.1", ports[1]))


async def test_a_connection_to_itself_is_not_a_listening_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With nothing listening on a port, a connect whose ephemeral source port is that port
    # succeeds, joined to itself. Made here for certain: bound to the port, connected to it.
    (port,) = free_ports(1)
    made = 0

    async def connect_to_itself(host: str, to: int, **_: Any) -> trio.SocketStream:
        nonlocal made
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind((host, to))
        await sock.connect((host, to))
        made += 1
        return trio.SocketStream(sock)

    monkeypatch.setattr(trio, "open_tcp_stream", connect_to_itself)
    with pytest.raises(trio.TooSlowError):
        await wait_for_port(port, 0.5)
    assert made >= 2  # it went on waiting, connection after connection


def test_ports_named_for_others_are_not_picked() -> None:
    # The gateway's ports are named before it binds them; the embedded nats-server's picks
    # must not take them. A port just released is one the kernel may hand out next.
    for _ in range(20):
        (named,) = free_ports(1)
        assert named not in free_ports(4, avoid=(named, 0, -1))
