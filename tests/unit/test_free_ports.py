"""Ports picked for the embedded nats-server and its monitor never coincide."""

from __future__ import annotations

import socket

from katydid.serve import free_ports


def test_ports_picked_together_are_distinct_and_bindable() -> None:
    for _ in range(50):
        ports = free_ports(3)
        assert len(set(ports)) == 3
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", ports[0]))
        b.bind(("127.0.0.1", ports[1]))
