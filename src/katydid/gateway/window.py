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
meanwhile, made a ~500 MB peak per gateway; ~210 MB since: AMD EPYC, 2 cores, README "Scale").
A client that never reads can keep its share for up to ``send_timeout_s`` (an event to it is
sent while the share is held).

Rule 1: a taker never waits for anything but the window while holding it: a session whose key
must wait for a seat in the queue gives its bytes back first (``Hold.release``), so one key's
full share never stalls another key's uploads.
Rule 2: a take larger than the window takes the whole window (a block is never refused).
"""

from __future__ import annotations

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
        # FIFO: the taker holding the turn waits for room, the others for the turn, in order
        # of arrival. Not a trio.Lock: each task waiting on one holds, besides its frames, the
        # WouldBlock its acquire raised (~0.8 KB), and in a storm thousands wait here.
        self._turn_held = False
        self._line = trio.lowlevel.ParkingLot()
        self._freed: trio.Event | None = None

    async def take(self, n: int) -> Hold:
        """``n`` bytes (at most the capacity), once the window has room for them."""
        n = max(0, min(n, self.capacity))
        if self._turn_held:
            await self._line.park()  # handed the turn by the taker before (``_pass_turn``)
        else:
            self._turn_held = True
            try:
                await trio.lowlevel.checkpoint()
            except BaseException:
                self._pass_turn()
                raise
        try:
            if self.used + n > self.capacity:
                self.waits += 1
            while self.used + n > self.capacity:
                self._freed = trio.Event()
                await self._freed.wait()
            self.used += n
        finally:
            self._pass_turn()
        self.peak = max(self.peak, self.used)
        return Hold(self, n)

    def _pass_turn(self) -> None:
        """The turn goes to the first taker in line (it holds it from now on), or is free."""
        if not self._line.unpark():
            self._turn_held = False

    def _give(self, n: int) -> None:
        self.used -= n
        if self._freed is not None:
            self._freed.set()
            self._freed = None
