"""The native protocol's text frames (protocol v1, JSON) as the session's typed inputs. Only
the native WebSocket door reads this wire; the other doors build ``Start``/``Stop`` from their
own (``inputs.py``)."""

from __future__ import annotations

import re
from typing import Any

from katydid import wire_json
from katydid.errors import ErrorCode, ProtocolError
from katydid.gateway.inputs import ClientInput, Resume, Start, Stop
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
    """A client's text frame: ``Start(options)``, ``Resume`` (a ``start`` with ``resume``) or
    ``Stop()``.

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
    if kind == "start" and "resume" in msg:
        return _resume(msg["resume"], msg.get("api_key"))
    if kind == "start":
        return Start(StartOptions.from_message(msg, limits))
    if kind == "stop":
        return Stop()
    # Named, but bounded: a 100 KB type was echoed back whole.
    shown = repr(kind) if len(kind) <= 64 else f"{kind[:64]!r}... ({len(kind)} characters)"
    raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown message type {shown}")


_SESSION_ID = re.compile(r"[0-9a-f]{32}")


def _resume(fields: Any, api_key: Any) -> Resume:
    """``start.resume``: ``{session_id, token, after_seq}``."""
    if not isinstance(fields, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "start.resume must be an object")
    session_id, token = fields.get("session_id"), fields.get("token")
    after_seq = fields.get("after_seq", -1)
    if not isinstance(session_id, str) or _SESSION_ID.fullmatch(session_id) is None:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "start.resume.session_id is not a session id")
    if not isinstance(token, str) or not 1 <= len(token) <= 128:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "start.resume.token must be a string")
    if isinstance(after_seq, bool) or not isinstance(after_seq, int) or after_seq < -1:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, "start.resume.after_seq must be an integer >= -1"
        )
    if api_key is not None and not isinstance(api_key, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "start.api_key has the wrong type")
    return Resume(session_id, token, after_seq, api_key)
