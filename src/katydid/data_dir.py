"""One ``katydid serve`` per data directory.

Two servers started without ``--data-dir`` share the default one, and with it their embedded
nats-servers' JetStream store: nats-server (2.15) does not lock a standalone store, so the second
restored the first's stream from disk, rewrote its configuration, and would have purged its
queued jobs as stale. ``serve`` holds an exclusive ``flock`` on ``serve.lock`` in the directory
while it runs; the kernel releases it when the process ends, however it ends, so a crash leaves
no stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import trio

from katydid.errors import KatydidError


class DataDirInUse(KatydidError):
    """Another process holds the data directory."""


@contextlib.contextmanager
def claimed(data_dir: Path) -> Iterator[None]:
    """Hold ``data_dir`` for this process until the block ends.

    Raises:
        DataDirInUse: another ``katydid serve`` holds it (the message names its pid and what
            to do).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = data_dir / "serve.lock"
    with open(lock, "a+", encoding="ascii") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read(32).strip()
            raise DataDirInUse(
                f"another katydid serve{f' (pid {holder})' if holder.isdigit() else ''} is"
                f" using {data_dir} (its NATS store); stop it, or give this one a directory of"
                " its own with --data-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


async def hold(
    data_dir: Path, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Claim ``data_dir`` (``started`` once it is held) and hold it until cancelled.

    Raises:
        DataDirInUse: as ``claimed``.
    """
    with claimed(data_dir):
        task_status.started()
        await trio.sleep_forever()
