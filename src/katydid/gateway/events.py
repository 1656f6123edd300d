"""The events the server sends a client (protocol v1), frozen, each with its JSON form."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from katydid.errors import ErrorCode

PROTOCOL_VERSION = 1


def _dump(d: dict[str, Any]) -> str:
    return json.dumps(d, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Ready:
    session_id: str
    model: str = ""  # the model the session's audio goes to
    models: tuple[dict[str, Any], ...] = ()  # what the server offers: name, languages, workers
    resume_token: str = ""  # what a reconnecting client shows to resume it (native door)

    def to_json(self) -> str:
        d: dict[str, Any] = {
            "type": "ready",
            "session_id": self.session_id,
            "protocol": PROTOCOL_VERSION,
            "model": self.model,
            "models": list(self.models),
        }
        if self.resume_token:
            d["resume_token"] = self.resume_token
        return _dump(d)


@dataclass(frozen=True, slots=True)
class Resumed:
    """A reconnected client has its session back: what the server holds of its audio (it sends
    the rest again), then every result after ``after_seq``."""

    session_id: str
    resume_token: str
    audio_received_s: float
    audio_complete: bool
    after_seq: int
    resume_offset_bytes: int | None = None  # raw PCM: where in its own stream to resend from

    def to_json(self) -> str:
        d: dict[str, Any] = {
            "type": "resumed",
            "session_id": self.session_id,
            "resume_token": self.resume_token,
            "audio_received_s": round(self.audio_received_s, 6),
            "audio_complete": self.audio_complete,
            "after_seq": self.after_seq,
        }
        if self.resume_offset_bytes is not None:
            d["resume_offset_bytes"] = self.resume_offset_bytes
        return _dump(d)


@dataclass(frozen=True, slots=True)
class Queued:
    position: int
    eta_s: float

    def to_json(self) -> str:
        return _dump({"type": "queued", "position": self.position, "eta_s": round(self.eta_s, 1)})


@dataclass(frozen=True, slots=True)
class Final:
    seq: int
    start_s: float
    end_s: float
    text: str
    segments: tuple[dict[str, Any], ...]
    kind: str = "final"
    worker: str = ""  # which worker transcribed it: for operators and fan-out diagnostics
    queue_s: float = 0.0  # how long the chunk waited in the queue
    language: str = ""  # what the chunk was decoded as (the detected one with "auto")

    def to_json(self) -> str:
        if self.kind == "partial":  # provisional: no times, segments or worker yet
            return _dump({"type": "partial", "seq": self.seq, "text": self.text})
        return _dump(
            {
                "type": self.kind,
                "seq": self.seq,
                "start_s": self.start_s,
                "end_s": self.end_s,
                "text": self.text,
                "segments": list(self.segments),
                "language": self.language,
                "worker": self.worker,
                "queue_s": round(self.queue_s, 3),
            }
        )


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    code: ErrorCode
    message: str
    retry_after_s: float | None = None
    seq: int | None = None  # set for a non-fatal error about one chunk

    def to_json(self) -> str:
        d: dict[str, Any] = {"type": "error", "code": str(self.code), "message": self.message}
        if self.retry_after_s is not None:
            d["retry_after_s"] = round(self.retry_after_s, 1)
        if self.seq is not None:
            d["seq"] = self.seq
        return _dump(d)


@dataclass(frozen=True, slots=True)
class Done:
    chunks: int
    audio_s: float
    failed_chunks: int
    # Speech that has no text in the transcript although it was decoded twice (start_s, end_s)
    uncovered: tuple[tuple[float, float], ...] = ()
    silent: tuple[int, ...] = ()  # chunks with no words, so no final (their seqs)

    @property
    def uncovered_s(self) -> float:
        return sum(end - start for start, end in self.uncovered)

    def to_json(self) -> str:
        return _dump(
            {
                "type": "done",
                "chunks": self.chunks,
                "audio_s": round(self.audio_s, 3),
                "failed_chunks": self.failed_chunks,
                "uncovered_s": round(self.uncovered_s, 2),
                "uncovered": [[round(a, 2), round(b, 2)] for a, b in self.uncovered],
                "silent": list(self.silent),
            }
        )


ServerEvent = Ready | Resumed | Queued | Final | ErrorEvent | Done
