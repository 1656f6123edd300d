"""What the gateway changes in a wsproto connection it keeps for a session's life, and why.

wsproto is written for one connection at a time; the gateway holds 10,000 of them, most
waiting for minutes. Each change is made only if wsproto still has the shape it was made for,
and a connection is left as wsproto made it otherwise (tests check the change is made with the
wsproto installed).

Rule 1: nothing here changes what wsproto does, only what it holds between two reads.
"""

from __future__ import annotations

import inspect
from collections import deque
from typing import Any

from wsproto.connection import Connection
from wsproto.events import Event
from wsproto.frame_protocol import Frame, Opcode


class _EventQueue(list[Event]):
    """What wsproto's ``Connection._events`` is used as (append, popleft, truth), in a list."""

    def popleft(self) -> Event:
        return self.pop(0)


class _Frames:
    """wsproto's frame parser (``FrameProtocol._parse_more_gen``) as an iterator with no frame
    of its own: the generator holds the last frame it yielded, payload and all (up to a read's
    16 KB), until the next read parses another, and an upload's client that is slow to send
    its next bytes (every client, in a storm on a busy CPU) kept it that long: ~450 frames of
    16 KB in a gateway of 3,400 sessions, 10,000 clients on an AMD EPYC with 2 cores. It also
    weighs 56 bytes against the generator's 216. Same frames, in the same order; done after a
    close frame or an error, as the generator is."""

    __slots__ = ("_done", "_proto")

    def __init__(self, proto: Any) -> None:
        self._proto = proto
        self._done = False

    def __iter__(self) -> _Frames:
        return self

    def __next__(self) -> Frame | None:
        if self._done:
            raise StopIteration
        proto = self._proto
        try:
            frame: Frame | None = proto._frame_decoder.process_buffer()
            if frame is not None:
                if not frame.opcode.iscontrol():
                    frame = proto._message_decoder.process_frame(frame)
                elif frame.opcode == Opcode.CLOSE:
                    frame = proto._process_close(frame)
                    self._done = True
        except BaseException:
            self._done = True  # an exception ends a generator too (wsproto's ParseFailed)
            raise
        return frame


def lightened(connection: Connection) -> Connection:
    """``connection`` holding less between reads: its event queue a list (wsproto keeps a
    deque, 760 bytes even empty, for the one event it may ever queue there: the abnormal
    closure when the stream ends; a list holds it for 56), its frame parser ``_Frames``."""
    events = getattr(connection, "_events", None)
    if type(events) is deque and not events:
        setattr(connection, "_events", _EventQueue())  # noqa: B010 - a private attribute
    proto = getattr(connection, "_proto", None)
    parser = getattr(proto, "_parse_more", None)
    if (
        inspect.isgenerator(parser)
        and inspect.getgeneratorstate(parser) == inspect.GEN_CREATED
        and not getattr(proto, "extensions", True)  # the generator's first step drops them
        and all(
            hasattr(proto, name)
            for name in ("_frame_decoder", "_message_decoder", "_process_close")
        )
    ):
        parser.close()
        setattr(proto, "_parse_more", _Frames(proto))  # noqa: B010 - a private attribute
    return connection


def fitted(connection: Connection) -> bool:
    """Whether ``lightened`` changed ``connection`` (both changes)."""
    proto = getattr(connection, "_proto", None)
    return isinstance(getattr(proto, "_parse_more", None), _Frames) and isinstance(
        getattr(connection, "_events", None), _EventQueue
    )


def nothing_buffered(connection: Connection) -> bool:
    """No byte read and no event made of them is left in wsproto (its frame buffer and event
    queue; wsproto has no accessor): the next event needs a read. False if wsproto changes
    shape (the reader then never parks)."""
    events = getattr(connection, "_events", None)
    decoder = getattr(getattr(connection, "_proto", None), "_frame_decoder", None)
    buffer = getattr(decoder, "buffer", None)
    if events is None or buffer is None:
        return False
    return not events and len(buffer) == 0
