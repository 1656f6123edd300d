"""What outlives a session's connection, and its gateway: the session's record in NATS.

A native-protocol session keeps a record in the KV bucket ``KATYDID_SESSIONS`` (key: the
session id) while it lives and for ``resume_window_s`` after its client or its gateway went
away; its results wait in the stream ``KATYDID_RESULTS`` as long. A client that reconnects, to
any gateway, resumes from them (``gateway/resumption.py``). Workers read the record before they
spend engine time on a job: no record means nobody will ever read the result (the session
ended, or was not resumed in time), and the job is skipped as ``orphaned``.

Pure values (no nats here): the record, its JSON, and the names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from katydid import wire_json
from katydid.errors import MessageError

SESSIONS_BUCKET = "KATYDID_SESSIONS"  # a JetStream KV bucket: one record per resumable session
RESULTS_STREAM = "KATYDID_RESULTS"  # every result, kept resume_window_s (limits retention)
GATEWAYS_BUCKET = "KATYDID_GATEWAYS"  # the deployment's secret; workers may not read it
GATEWAYS_BYTES = 1024 * 1024  # its bound: one key
# A record names at most this many of its session's queued jobs (SessionRecord.queued): the
# oldest, which say where the session stands; the record is written before every final's
# publish, so it stays small however long the upload.
QUEUED_KEPT = 32

# A gateway's heartbeat: katydid.gateways.<gateway id>, every gateway_heartbeat_s. Workers set
# aside the jobs of sessions whose gateway they stopped hearing (it died; they may be resumed).
GATEWAYS_SUBJECT = "katydid.gateways"


def gateway_ping_subject(gateway_id: str) -> str:
    """Where a gateway answers "are you there": a worker asks before it spends engine time on a
    session of a gateway it has not heard for a moment. NATS itself says "no responders" the
    instant the gateway's connection is gone (a SIGKILLed process's socket closes): no waiting
    out missed heartbeats."""
    return f"{GATEWAYS_SUBJECT}.{gateway_id}.ping"


ATTACHED = "attached"  # a gateway serves the session's client now
DETACHED = "detached"  # the client went away; its results wait for it to resume
STATES = (ATTACHED, DETACHED)


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A resumable session, as any gateway needs it to take the session over.

    ``samples``: 16 kHz samples of the session's audio already in jobs (the client resends from
    there); ``next_seq``: the chunk seq the next job gets; ``stopped``: the client sent ``stop``
    and every chunk is published (the session only waits for results).
    """

    session_id: str
    state: str
    gateway: str  # the gateway serving it (or that served it last)
    model: str
    options: dict[str, Any]  # the start message's fields the session runs with
    key: str = ""  # the API key's name (with keys configured): a resume must carry the same
    samples: int = 0
    next_seq: int = 0
    stopped: bool = False
    lane: str = "interactive"
    audio_s: float = 0.0  # the session's audio so far (done's audio_s)
    updated_unix: float = 0.0
    owner: str = ""  # the connection serving it: a newer one takes over
    uncovered: list[list[float]] = field(default_factory=list)
    # Before this (unix time) a resume gets no partial ahead of the queue: one per
    # resume_first_partial_every_s, however often its client reconnects, to whichever gateway
    ahead_after_unix: float = 0.0
    # [seq, stream seq] of its oldest final jobs in the stream and unanswered (at most
    # QUEUED_KEPT): where a resumed session stands in the queue (its `queued` updates), and
    # what to delete from the stream if it then ends before they are answered
    queued: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise MessageError(f"session record state {self.state!r} is not one of {STATES}")
        if self.samples < 0 or self.next_seq < 0:
            raise MessageError("session record samples and next_seq must be >= 0")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SessionRecord:
        try:
            d = wire_json.loads(raw.decode())
            if not isinstance(d, dict):
                raise MessageError("a session record is a JSON object")
            return cls(
                session_id=str(d["session_id"]),
                state=str(d["state"]),
                gateway=str(d.get("gateway", "")),
                model=str(d.get("model", "")),
                options=dict(d.get("options") or {}),
                key=str(d.get("key") or ""),
                samples=int(d.get("samples", 0)),
                next_seq=int(d.get("next_seq", 0)),
                stopped=bool(d.get("stopped", False)),
                lane=str(d.get("lane") or "interactive"),
                audio_s=float(d.get("audio_s", 0.0)),
                updated_unix=float(d.get("updated_unix", 0.0)),
                owner=str(d.get("owner", "")),
                uncovered=[[float(a), float(b)] for a, b in d.get("uncovered") or []],
                ahead_after_unix=float(d.get("ahead_after_unix", 0.0)),
                queued=[[int(s), int(ss)] for s, ss in d.get("queued") or []][:QUEUED_KEPT],
            )
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
            raise MessageError(f"bad session record: {exc}") from exc


def turn_ahead(record: SessionRecord, unix_now: float, every_s: float) -> float | None:
    """Whether a resume of ``record``'s session now may send its first partial ahead of the
    queue: the record's next ``ahead_after_unix`` if so (the resume writes it), None if an
    earlier resume had that turn less than ``every_s`` ago. A client that reconnects over and
    over gets no more engine time ahead of other sessions than one partial per ``every_s``."""
    if record.ahead_after_unix > unix_now:
        return None
    return unix_now + every_s


def results_filter(session_id: str) -> str:
    """The results of one session, whichever gateway published its jobs and whichever worker
    answered: ``katydid.results.<gateway>.<session>.<worker user>``."""
    return f"katydid.results.*.{session_id}.*"
