"""What a client tells its session, whatever its door's wire: typed and frozen, as h11's
``Connection`` takes events. Each door parses its own wire into these (the native protocol's
JSON in ``native_wire.py``; the HTTP form, Wyoming's and vosk's messages in their doors);
audio comes as bytes (``Session.receive_bytes``, ``receive_file``)."""

from __future__ import annotations

from dataclasses import dataclass

from katydid.gateway.options import StartOptions


@dataclass(frozen=True, slots=True)
class Start:
    """Begin: the session's options, validated against the gateway's limits."""

    options: StartOptions


@dataclass(frozen=True, slots=True)
class Stop:
    """The audio is over (a file: all of it has been sent)."""


@dataclass(frozen=True, slots=True)
class Resume:
    """Take back a session whose connection was lost (native protocol): its id, the token its
    ``ready`` (or last ``resumed``) gave, and the last result seq the client has (-1: none)."""

    session_id: str
    token: str
    after_seq: int
    api_key: str | None = None


ClientInput = Start | Stop | Resume
