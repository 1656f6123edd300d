"""Accepting connections: a loop per listener that lives in its door's scope (cancelling it closes
the listener), and that rides out a process out of file descriptors with sampled lines.

``trio.serve_listeners`` moves its loops into the handlers' nursery, out of reach of a scope
that should stop accepting while the sessions go on (a draining gateway), and logs a traceback
every 100 ms while ``accept`` fails with EMFILE: ten multi-line records a second, per listener,
for as long as the process is full.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from katydid.log import SampledLogger

# Out of descriptors or buffers: the listener is fine, the process is full for now.
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
RETRY_S = 0.1


async def accept_forever(
    listener: trio.abc.Listener[Any],
    handlers: trio.Nursery,
    handler: Callable[[Any], Awaitable[None]],
    sampled: SampledLogger,
) -> None:
    """Accept on ``listener`` until cancelled (then close it), each connection served by
    ``handler`` in ``handlers``, which closes its stream.

    Raises:
        OSError: the listener failed for another reason than the process being full.
    """
    async with listener:
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
                handlers.start_soon(handler, stream)
