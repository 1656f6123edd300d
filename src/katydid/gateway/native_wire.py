"""The native protocol's text frames (protocol v1, JSON) as the session's typed inputs. Only
the native WebSocket door reads this wire; the other doors build ``Start``/``Stop`` from their
own (``inputs.py``)."""

from __future__ import annotations

from katydid import wire_json
from katydid.errors import ErrorCode, ProtocolError
from katydid.gateway.inputs import ClientInput, Start, Stop
from katydid.gateway.options import Limits, StartOptions
from katydid.gateway.outputs import Output
from katydid.gateway.session import Session


def receive_text(session: Session, text: str, now: float) -> list[Output]:
    """A text frame, given to the session: a message that does not parse ends it, coded."""
    try:
        event = parse_text(text, session.limits)
    except ProtocolError as exc:
        return session.refuse(exc, now)
    return session.receive(event, now)


def parse_text(text: str, limits: Limits) -> ClientInput:
    """A client's text frame: ``Start(options)`` or ``Stop()``.

    Raises:
        ProtocolError: too large, not JSON, not a message, an unknown type, or a bad ``start``.
    """
    # In bytes, as on the wire (characters would let 4-byte ones through at 4x the bound).
    size = len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
    if size > limits.max_frame_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"control message of {size} bytes exceeds {limits.max_frame_bytes}",
        )
    try:
        msg = wire_json.loads(text)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "control message is not valid JSON") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, "control message must be an object with a string 'type'"
        )
    kind = msg["type"]
    if kind == "start":
        return Start(StartOptions.from_message(msg, limits))
    if kind == "stop":
        return Stop()
    # Named, but bounded: a 100 KB type was echoed back whole.
    shown = repr(kind) if len(kind) <= 64 else f"{kind[:64]!r}... ({len(kind)} characters)"
    raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown message type {shown}")
