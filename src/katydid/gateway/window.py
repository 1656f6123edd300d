"""The gateway-wide window of uploaded audio being decoded and published.

Each upload is bounded on its own (``upload_memory_bytes``, one decoded block), but nothing
bounded how many were decoded at once: in a connection storm, every session that had sent
``stop`` could hold a decoder, a decoded block and a job body on its way to NATS at the same
moment. A session takes its block's bytes (and its open decoder's) from the window before
opening or decoding it and gives them back once its chunks are published (or it ends); past
``publish_window_bytes`` sessions wait their turn, in order of arrival, holding only their
(spooled) upload. Between the blocks of a long file a session keeps its decoder and the chunk
in progress; a short file's one chunk is published under its block's share (with 10,000 clients
uploading a 3 s WAV, sessions that queued again to publish it, each holding its decoded chunk
meanwhile, made a ~500 MB peak per gateway; ~210 MB since: AMD EPYC, 2 cores; docs/benchmarks.md).
A client that never reads can keep its share for up to ``send_timeout_s`` (an event to it is
sent while the share is held).

Rule 1: a taker never waits for anything but the window while holding it: a session whose key
must wait for a seat in the queue gives its bytes back first (``Hold.release``), so one key's
full share never stalls another key's uploads.
Rule 2: a take larger than the window takes the whole window (a block is never refused).
"""

from __future__ import annotations

from collections import OrderedDict

import trio


class Hold:
    """Bytes taken from a window; given back once (``release`` is idempotent)."""

    __slots__ = ("_window", "bytes")

    def __init__(self, window: ByteWindow, n: int) -> None:
        self._window: ByteWindow | None = window
        self.bytes = n

    def release(self) -> None:
        if self._window is not None:
            self._window._give(self.bytes)
            self._window = None

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ByteWindow:
    """At most ``capacity`` bytes held at once; takers wait first come, first served."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("a window needs capacity >= 1")
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self.waits = 0  # takes that had to wait (since start)
        # The takers waiting, in order of arrival, and the bytes each wants. Room that is given
        # back goes to them at once, as many as it fits (``_admit``): a line where each taker
        # took its bytes when it next ran admitted one a pass of the scheduler, and in a storm
        # (a pass runs thousands of tasks) the window stood nearly empty with 2,000 uploads
        # waiting in line (10,000 clients; docs/benchmarks.md). Not a trio.Lock either: each task
        # waiting on one holds, besides its frames, the WouldBlock its acquire raised.
        self._line: OrderedDict[trio.lowlevel.Task, int] = OrderedDict()

    @property
    def waiting(self) -> int:
        return len(self._line)

    async def take(self, n: int) -> Hold:
        """``n`` bytes (at most the capacity), once the window has room for them."""
        n = max(0, min(n, self.capacity))
        if not self._line and self.used + n <= self.capacity:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._count(n)
            await trio.lowlevel.cancel_shielded_checkpoint()  # taken: a cancel comes later
            return Hold(self, n)
        self.waits += 1
        task = trio.lowlevel.current_task()
        self._line[task] = n

        def abort(_: object) -> trio.lowlevel.Abort:
            del self._line[task]
            self._admit()  # it may have stood in front of takers that fit
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
        return Hold(self, n)  # counted by ``_admit``

    def _count(self, n: int) -> None:
        self.used += n
        self.peak = max(self.peak, self.used)

    def _admit(self) -> None:
        """The takers at the front of the line that fit now, in order, hold their bytes."""
        line = self._line
        while line:
            task = next(iter(line))
            n = line[task]
            if self.used + n > self.capacity:
                return
            del line[task]
            self._count(n)
            trio.lowlevel.reschedule(task)

    def _give(self, n: int) -> None:
        self.used -= n
        self._admit()
