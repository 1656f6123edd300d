"""Katydid's error tree: every error the project raises on purpose.

    KatydidError                 root; callers catch this, never a library's exception types
    ├── ConfigError              bad configuration file or environment value
    │   └── ListenError          a door cannot listen on its address (in use, not this host's)
    ├── ModelError               model missing, corrupt or not convertible (names the fix)
    ├── AudioError               audio that cannot be decoded: garbage, truncated, empty, unsupported
    ├── EngineError              the recogniser failed on valid audio
    ├── MessageError             a NATS message (job, result, heartbeat) is malformed
    ├── NatsError                NATS unreachable, timed out, or refused a request
    │   ├── StreamFull           the job stream is at a configured bound: retry later
    │   └── JobTooLarge          one job is over a size limit: retrying cannot succeed
    └── ProtocolError            a client broke protocol v1; carries a client error code and close code

Error codes sent to clients form a closed set (``ErrorCode``); each maps to a WebSocket close code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from enum import StrEnum


class ErrorCode(StrEnum):
    """Client-visible error codes (protocol v1); a closed, documented set."""

    BAD_MESSAGE = "bad_message"
    UNSUPPORTED_AUDIO = "unsupported_audio"
    TOO_LARGE = "too_large"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    UNSUPPORTED_OPTION = "unsupported_option"
    UNAUTHORIZED = "unauthorized"  # no key, or a wrong or revoked one (keys file configured)
    QUOTA_EXCEEDED = "quota_exceeded"  # the key's sessions or audio budget: retry later
    RESUME_EXPIRED = "resume_expired"  # no such session to resume (ended, or past its window)
    SESSION_TAKEN = "session_taken"  # a newer connection resumed the session


# WebSocket close codes (RFC 6455 §7.4.1 and the 4000-4999 private range).
CLOSE_CODES: dict[ErrorCode, int] = {
    ErrorCode.BAD_MESSAGE: 1008,  # policy violation
    ErrorCode.UNSUPPORTED_AUDIO: 1003,  # unsupported data
    ErrorCode.TOO_LARGE: 1009,  # message too big
    ErrorCode.OVERLOADED: 1013,  # try again later
    ErrorCode.TIMEOUT: 4008,
    ErrorCode.INTERNAL: 1011,
    ErrorCode.UNSUPPORTED_OPTION: 1003,  # unsupported data: the model cannot do what was asked
    ErrorCode.UNAUTHORIZED: 4401,  # HTTP's 401 in the private range
    ErrorCode.QUOTA_EXCEEDED: 4429,  # HTTP's 429
    ErrorCode.RESUME_EXPIRED: 4410,  # HTTP's 410 Gone
    ErrorCode.SESSION_TAKEN: 4409,  # HTTP's 409 Conflict
}


class KatydidError(Exception):
    """Root of every error Katydid raises deliberately."""


class ConfigError(KatydidError):
    """A configuration file or ``KATYDID_*`` variable holds an invalid value."""


class ListenError(ConfigError):
    """A door cannot listen where it was told to."""


@contextlib.contextmanager
def listening(door: str, host: str, port: int) -> Iterator[None]:
    """Binding ``door``'s port: the system's refusal, said with the address it was about
    ("[Errno 98] Address already in use" alone names neither)."""
    try:
        yield
    except* OSError as group:
        exc = group.exceptions[0]  # hypercorn's bind fails inside a nursery: in a group
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        raise ListenError(f"the {door} cannot listen on {host}:{port}: {reason.lower()}") from exc


class ModelError(KatydidError):
    """A model is missing, corrupt, or cannot be converted."""


class AudioError(KatydidError):
    """Audio could not be decoded (garbage, truncated, empty or unsupported input)."""

    code = ErrorCode.UNSUPPORTED_AUDIO


class EngineError(KatydidError):
    """The speech recogniser failed on input that decoded fine."""


class ProtocolError(KatydidError):
    """A client violated the protocol; the session gets ``code`` and is closed."""

    def __init__(
        self, code: ErrorCode, message: str, *, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def close_code(self) -> int:
        return CLOSE_CODES[self.code]


class MessageError(KatydidError):
    """A job, result or other NATS message is malformed."""


class NatsError(KatydidError):
    """NATS is unreachable, timed out, or refused a request."""


class StreamFull(NatsError):
    """The job stream is at a configured bound (discard=new): the caller should retry later."""


class JobTooLarge(NatsError):
    """One job is over the stream's or server's size limit (body or headers): retrying the same
    job can never succeed."""


class ClientGone(Exception):
    """The door's client cannot be reached any more (raised by ``deliver`` and by a door's
    receive); ``too_large``: its transport closed it for a message over its own limit;
    ``said_goodbye``: it closed with 1000 (normal closure): it wants no more of its session,
    which is then not kept for it to resume."""

    def __init__(self, *, too_large: bool = False, said_goodbye: bool = False) -> None:
        super().__init__("the client is gone")
        self.too_large = too_large
        self.said_goodbye = said_goodbye
