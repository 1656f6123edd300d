"""Wyoming's framing, sans-IO: events in and out of bytes exactly as the ``wyoming`` package
writes them. An event is a JSON header line (``type``, optional ``data``, ``data_length``,
``payload_length``, ``version``), then ``data_length`` bytes of JSON merged into ``data``, then
``payload_length`` bytes of payload.

Rule: every part is bounded (header line, data, payload); anything else is a ``FramingError``
and the connection is closed (there is no way to resynchronise a byte stream).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from katydid import wire_json

VERSION = "1.5.0"  # the protocol version written in headers (what the wyoming package writes)


class FramingError(Exception):
    """Bytes that are not Wyoming events, or over a bound."""


@dataclass(frozen=True, slots=True)
class WyomingEvent:
    type: str
    data: dict[str, Any] = field(default_factory=dict)
    payload: bytes | None = None


def encode(event: WyomingEvent) -> bytes:
    header: dict[str, Any] = {"type": event.type, "version": VERSION}
    body = b""
    if event.data:
        body = json.dumps(event.data, ensure_ascii=False).encode()
        header["data_length"] = len(body)
    if event.payload:
        header["payload_length"] = len(event.payload)
    line = json.dumps(header, ensure_ascii=False).encode() + b"\n"
    return line + body + (event.payload or b"")


class WyomingReader:
    """Bytes in (``feed``), events out (``next_event``), bounded."""

    def __init__(self, *, max_line: int, max_data: int, max_payload: int) -> None:
        self.max_line = max_line
        self.max_data = max_data
        self.max_payload = max_payload
        self._buf = bytearray()
        self._header: dict[str, Any] | None = None

    def feed(self, data: bytes | bytearray) -> None:
        self._buf += data

    def next_event(self) -> WyomingEvent | None:
        """The next whole event, or None until more bytes come.

        Raises:
            FramingError: not an event, or a part over its bound.
        """
        if self._header is None:
            end = self._buf.find(b"\n")
            if end < 0:
                if len(self._buf) > self.max_line:
                    raise FramingError(f"header line over {self.max_line} bytes")
                return None
            if end > self.max_line:
                raise FramingError(f"header line over {self.max_line} bytes")
            self._header = _header(bytes(self._buf[:end]), self)
            del self._buf[: end + 1]
        header = self._header
        need = header["data_length"] + header["payload_length"]
        if len(self._buf) < need:
            return None
        data = dict(header["data"])
        n = header["data_length"]
        if n:
            try:
                extra = wire_json.loads(bytes(self._buf[:n]))
            except ValueError:
                raise FramingError("event data is not JSON") from None
            if not isinstance(extra, dict):
                raise FramingError("event data is not a JSON object")
            data.update(extra)
        payload = bytes(self._buf[n:need]) if header["payload_length"] else None
        del self._buf[:need]
        self._header = None
        return WyomingEvent(header["type"], data, payload)


def _header(line: bytes, bounds: WyomingReader) -> dict[str, Any]:
    try:
        head = wire_json.loads(line)
    except ValueError:
        raise FramingError("header line is not JSON") from None
    if not isinstance(head, dict) or not isinstance(head.get("type"), str):
        raise FramingError("header line is not an event (no string 'type')")
    data = head.get("data") or {}
    if not isinstance(data, dict):
        raise FramingError("event data is not a JSON object")
    lengths = {}
    for key, bound in (("data_length", bounds.max_data), ("payload_length", bounds.max_payload)):
        value = head.get(key) or 0
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FramingError(f"{key} is not a byte count")
        if value > bound:
            raise FramingError(f"{key} {value} over {bound} bytes")
        lengths[key] = value
    return {"type": head["type"], "data": data, **lengths}
