"""What C libraries write to the gateway's stderr, as sampled structured log lines.

libsndfile's MP3 decoder (libmpg123) writes a raw line to file descriptor 2 for every upload it
gives up on (``[src/libmpg123/parse.c:skip_junk():1260] error: Giving up searching valid MPEG
header...``): not JSON, and past the log sampler, so any client sending garbage MP3s wrote lines
into the gateway's log at will. ``capture`` points fd 2 at a pipe that a thread reads: each line
becomes a ``native_stderr`` warning, at most ``burst`` per ``window_s`` (then one
``native_stderr_suppressed`` with the count). The process's own writers keep the real stderr:
``sys.stderr`` is reopened on a copy of it (structlog, tracebacks, and the children that
``serve`` starts with ``stderr=sys.stderr``).

Rule 1: call it before logging is configured: a logger made earlier holds the old
``sys.stderr``, whose descriptor is now the pipe (its lines would come back as native ones).
"""

from __future__ import annotations

import faulthandler
import os
import select
import sys
import threading
import time

import structlog

_MAX_LINE = 500  # characters of a native line that are logged


def capture(*, burst: int = 5, window_s: float = 60.0) -> None:
    """Route fd 2 through a sampled ``native_stderr`` log line; ``sys.stderr`` keeps the real
    stderr (for this process's own writers and its children)."""
    real = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = open(  # noqa: SIM115 - the process's stderr from now on, never closed
        real, "w", buffering=1, encoding="utf-8", errors="backslashreplace"
    )
    if faulthandler.is_enabled():
        faulthandler.enable(file=sys.stderr)  # a crash's report must not wait on the thread
    threading.Thread(
        target=_forward, args=(read_fd, burst, window_s), name="native-stderr", daemon=True
    ).start()


def _forward(read_fd: int, burst: int, window_s: float) -> None:
    log = structlog.get_logger("katydid.native")
    window_start, written, suppressed = time.monotonic(), 0, 0
    pending = b""
    while True:
        ready, _, _ = select.select([read_fd], [], [], window_s)
        now = time.monotonic()
        if now - window_start >= window_s:
            if suppressed:
                log.warning("native_stderr_suppressed", lines=suppressed, window_s=window_s)
            window_start, written, suppressed = now, 0, 0
        if not ready:
            continue
        chunk = os.read(read_fd, 65536)
        if not chunk:
            return
        *lines, pending = (pending + chunk).split(b"\n")
        pending = pending[-4 * _MAX_LINE :]  # a line that never ends is not held whole
        for raw in lines:
            text = raw.decode("utf-8", "backslashreplace").strip()
            if not text:
                continue
            if written < burst:
                written += 1
                log.warning("native_stderr", text=text[:_MAX_LINE])
            else:
                suppressed += 1
