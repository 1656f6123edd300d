"""Accepting connections: a loop per listener that lives in its door's scope (cancelling it closes
the listener), and that rides out a process out of file descriptors with sampled lines.

``trio.serve_listeners`` moves its loops into the handlers' nursery, out of reach of a scope
that should stop accepting while the sessions go on (a draining gateway), and logs a traceback
every 100 ms while ``accept`` fails with EMFILE: ten multi-line records a second, per listener,
for as long as the process is full.

A plain TCP listener is drained each time it is woken: trio's ``accept`` takes one connection and
then yields, one connection per scheduler pass, and in a storm a pass runs thousands of tasks.
The kernel's accept queue (``somaxconn``, 4,096 here) then fills, and the kernel drops the SYNs
of the clients behind it, which retry after 1, 3, 7, 15, 31 s: one gateway under 10,000 clients
connected half of them in 14 s and left 1,334 unconnected after 60 s (TcpExtListenOverflows;
AMD EPYC, 2 cores, shared with the workers and the load).
Taken at once, the connections wait in the gateway instead, in the order they came, within the
handshake timeout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio

from katydid.log import SampledLogger

# Out of descriptors or buffers: the listener is fine, the process is full for now.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
RETRY_S = 0.1
# Connections taken per wake-up of a plain TCP listener, beyond the first: bounds one pass's work.
ACCEPT_BATCH = 512


async def accept_forever(
    listener: trio.abc.Listener[Any],
    handlers: trio.Nursery,
    handler: Callable[[Any], Awaitable[None]],
    sampled: SampledLogger,
    *,
    wrap: Callable[[Any], trio.abc.Stream] | None = None,
) -> None:
    """Accept on ``listener`` until cancelled (then close it), each connection served by
    ``handler`` in ``handlers``, which closes its stream. ``wrap`` makes each accepted stream
    the one served (TLS: ``trio.SSLStream``, so that a TLS door takes its storm at once too;
    a ``trio.SSLListener`` would be accepted one connection a pass).

    Raises:
        OSError: the listener failed for another reason than the process being full.
    """
    async with listener:
        ready = _ready_queue(listener)
        with ready if ready is not None else contextlib.nullcontext():
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in CAPACITY_ERRNOS:
                        raise
                    sampled.log(
                        "error",
                        "accept_failed",
                        error=errno.errorcode.get(exc.errno or 0, str(exc.errno)),
                        detail=os.strerror(exc.errno or 0),
                        retry_in_s=RETRY_S,
                    )
                    await trio.sleep(RETRY_S)
                else:
                    handlers.start_soon(handler, wrap(stream) if wrap else stream)
                    if ready is not None:
                        for more in _take_ready(ready, ACCEPT_BATCH):
                            handlers.start_soon(handler, wrap(more) if wrap else more)


def tls(
    context: ssl.SSLContext, *, https_compatible: bool = False
) -> Callable[[Any], trio.SSLStream[Any]]:
    """``wrap`` for a TLS door: what ``trio.SSLListener`` makes of each accepted stream."""
    return partial(
        trio.SSLStream, ssl_context=context, server_side=True, https_compatible=https_compatible
    )


def _ready_queue(listener: trio.abc.Listener[Any]) -> socket.socket | None:
    """A second handle on a plain TCP listener's socket (the same kernel socket, its own
    descriptor), accepted from without waiting; closed with the listener (``accept_forever``):
    an open handle would keep the port listening. None for anything else (TLS, tests)."""
    if type(listener) is not trio.SocketListener:
        return None
    try:
        fd = os.dup(listener.socket.fileno())
    except OSError:
        return None
    ready = socket.socket(fileno=fd)
    ready.setblocking(False)
    return ready


def _take_ready(ready: socket.socket, most: int) -> list[trio.SocketStream]:
    """Up to ``most`` connections already waiting in the kernel's accept queue, as
    ``trio.SocketListener.accept`` makes them. Any error ends the batch: the next ``accept``
    meets it again, or the connection it concerned is gone."""
    streams = []
    for _ in range(most):
        try:
            conn, _ = ready.accept()
        except OSError:
            break
        streams.append(trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
    return streams
