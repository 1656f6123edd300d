"""What the client knows to resume a session (docs/protocol.md, "Resuming a session"; the
contract: spec/resume.md): the token and the last result seen, which results are new, whether a
lost connection may be resumed at all, what audio to send again, and how long to wait between
attempts. Pure: no I/O, so the rules are tested on their own and shared by every caller of
``client.transcribe`` (the CLI and the load tester resume the same way).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from katydid.client_conn import ClientError, SessionResult
from katydid.load.backoff import RetryPolicy

# Close codes that end a session for good: resuming after them would only be refused. 1000 is
# the normal end (after `done`, or the server's decision before it); the others answer something
# the client did (bad data, no key, a newer connection took the session, the resume window
# passed). Anything else, 1006 above all (no close frame: a reset, a dead network), 1001 (a
# gateway going away) and 1011/1012 (a gateway's failure or restart), leaves the session
# detached on the server, so the client comes back for it.
SESSION_ENDING_CLOSE_CODES = frozenset(
    {1000, 1002, 1003, 1007, 1008, 1009, 1010, 1013, 4008, 4401, 4409, 4410, 4429}
)

# Answers to a resume (or, for session_taken, news mid-session) that no retry can change.
_FATAL = {
    "resume_expired": "the server no longer holds the session (its resume window passed, or it "
    "ended): cannot resume",
    "unauthorized": "the server refused to resume the session (wrong token or API key)",
    "session_taken": "another connection resumed the session",
}
# Answers to a resume that may change with time (honouring retry_after_s).
RETRY_LATER = frozenset({"overloaded", "quota_exceeded"})

# First wait ~0.2 s (jitter takes up to half off), doubling to 2 s: fast enough that a gateway's
# restart costs little, never a spin loop. The total is bounded by time (reconnect_s), not by a
# count, so max_attempts is not consulted.
RECONNECT_BACKOFF = RetryPolicy(base_s=0.2, max_s=2.0, max_attempts=1, jitter=0.5)


@dataclass(frozen=True, slots=True)
class ResumeOptions:
    """How the client resumes.

    Attributes:
        enabled: False: a lost connection ends the session (as before resumption existed).
        reconnect_s: how long, from a loss, the client tries to get the session back.
        buffer_s: with paced (live) PCM, how much recent audio the client keeps for a resume.
    """

    enabled: bool = True
    reconnect_s: float = 60.0
    buffer_s: float = 300.0


_FATAL_CLOSE = {4401: "unauthorized", 4409: "session_taken", 4410: "resume_expired"}


def fatal_error(code: str, message: str) -> ClientError | None:
    """The ClientError for an error event that ends a resumable session, if it is one."""
    if code not in _FATAL:
        return None
    return ClientError(code, f"{_FATAL[code]} ({code}: {message})")


def fatal_close(code: int | None, *, resuming: bool) -> ClientError | None:
    """The ClientError for a close (with no error event before it) that ends the session:
    any, in answer to a resume; mid-session, only ``session_taken``'s."""
    kind = _FATAL_CLOSE.get(code or 0)
    if kind is not None and (resuming or kind == "session_taken"):
        return ClientError(kind, f"{_FATAL[kind]} (close code {code})")
    if resuming:
        return ClientError("resume_failed", f"the server closed the resume with code {code}")
    return None


def reconnect_wait_s(attempts: int, retry_after_s: float | None, rng: random.Random) -> float:
    return RECONNECT_BACKOFF.delay_s(max(1, attempts), retry_after_s=retry_after_s, rng=rng)


@dataclass(slots=True)
class ResumeState:
    """The session as the client tracks it across connections."""

    session_id: str = ""
    token: str | None = None  # None: the server offers no resume (older), or not yet ready
    after_seq: int = -1  # the highest seq of a final or chunk error delivered
    seen: set[int] = field(default_factory=set)

    @property
    def resumable(self) -> bool:
        return bool(self.session_id and self.token)

    def on_ready(self, event: dict[str, Any]) -> None:
        self.session_id = str(event.get("session_id", ""))
        token = event.get("resume_token")
        self.token = str(token) if token else None

    def on_resumed(self, event: dict[str, Any]) -> None:
        token = event.get("resume_token")
        if token:  # each resume hands out a new token: the old one is spent
            self.token = str(token)

    def start_message(self, api_key: str | None) -> dict[str, Any]:
        """The ``start`` that resumes: the session keeps its options, so only the key goes."""
        start: dict[str, Any] = {
            "type": "start",
            "resume": {
                "session_id": self.session_id,
                "token": self.token,
                "after_seq": self.after_seq,
            },
        }
        if api_key:
            start["api_key"] = api_key
        return start

    def accept(self, event: dict[str, Any], result: SessionResult) -> bool:
        """Whether a final or chunk error is new (deliver it) or a duplicate (drop it).

        The server replays exactly what follows ``after_seq``; this is the defence should it
        not: the caller sees each seq once whatever arrives."""
        seq = event.get("seq")
        if not isinstance(seq, int):
            return True
        if seq in self.seen:
            result.duplicates += 1
            return False
        if seq < self.after_seq:
            result.out_of_order += 1  # delivered (it is new), counted: it should not happen
        self.seen.add(seq)
        self.after_seq = max(self.after_seq, seq)
        return True


def resend_offset(
    resumed: dict[str, Any], *, fmt: str, sample_rate: int, channels: int, size: int
) -> int | None:
    """Where to send audio from after ``resumed``: None for nothing (the server holds it all),
    0 for a container file (sent whole: the server skips what it has), else the PCM byte offset
    (the server's own figure when it gives one; else from ``audio_received_s``), on a frame
    boundary and within the audio."""
    if resumed.get("audio_complete"):
        return None
    if fmt != "pcm_s16le":
        return 0
    frame = 2 * channels
    exact = resumed.get("resume_offset_bytes")
    if isinstance(exact, int):
        offset = exact
    else:
        offset = math.floor(float(resumed.get("audio_received_s", 0.0)) * sample_rate) * frame
    offset -= offset % frame
    return max(0, min(offset, size - size % frame))


def check_window(offset: int, produced: int, buffer_bytes: int, bytes_per_s: int) -> None:
    """A live source keeps only its last ``buffer_bytes``: a resume that needs older audio
    fails here, said plainly, rather than leaving a silent gap in the transcript.

    Raises:
        ClientError: ``resume_gap``.
    """
    oldest = max(0, produced - buffer_bytes)
    if offset < oldest:
        raise ClientError(
            "resume_gap",
            f"the server needs audio from {offset / bytes_per_s:.1f} s on; the client kept only "
            f"the last {buffer_bytes / bytes_per_s:.0f} s (from {oldest / bytes_per_s:.1f} s): "
            "resuming would leave a gap",
        )
