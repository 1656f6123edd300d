"""Whether anyone will read a job's result: its session's record in the KV bucket
``KATYDID_SESSIONS`` (``katydid.session_record``, ``spec/resume.md``), read before the job
takes engine time.

Rule 1: only a definite "no record" orphans a job: the key is missing (never written, expired
after the resume window) or its last entry is a delete/purge marker (the session ended).
Rule 2: anything else is live: a record; no bucket (a deployment without resumption: nothing
answers the direct get); a read that failed or timed out. A check that failed never loses work.
Rule 3: the read is a JetStream direct get of that one key, the only KV call the worker role may
make (``katydid.bus.accounts``); the bucket must allow direct gets (``direct=True``), else it
looks absent and every job is live.
Rule 4: a verdict is remembered ``ttl_s`` (a long file's chunks come in a burst: one read for
them all), for at most ``max_sessions`` sessions (oldest forgotten first).
Rule 5: a live verdict carries the record's state and gateway (``set_aside.py`` sets aside the
jobs of a session waiting for its client); a record it cannot parse carries neither: its job is
decoded as before.
Rule 6: a record older than the resume window is an orphan's, whatever the bucket still holds:
nobody wrote it for the whole window (its gateway refreshes a served session's every quarter
window), and JetStream removes an expired entry a moment after its age passes, not at once.
Judged when the verdict is used, not when it was read (a verdict is reused ``ttl_s``).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import nats.errors

from katydid.errors import MessageError
from katydid.session_record import SESSIONS_BUCKET, SessionRecord

# One subject token, as the gateway's session ids (32 hex) are; and what the worker role's
# permission (``...$KV.KATYDID_SESSIONS.*``) lets it ask for.
_KEY = re.compile(r"[A-Za-z0-9_=-]{1,128}")
_ENDED = {"DEL": "record deleted", "PURGE": "record purged"}  # KV-Operation of a marker


class Liveness(StrEnum):
    LIVE = "live"  # the session has a record: its result will be read
    ORPHANED = "orphaned"  # no record: nobody will ever read the result
    NO_BUCKET = "no_bucket"  # nothing answers: no resumption here; transcribed
    UNCHECKED = "unchecked"  # the read failed: transcribed (Rule 2)


def direct_get_subject(session_id: str) -> str:
    """The direct get of one session's record: the last message on its key's subject."""
    return f"$JS.API.DIRECT.GET.KV_{SESSIONS_BUCKET}.$KV.{SESSIONS_BUCKET}.{session_id}"


def verdict(headers: Mapping[Any, str] | None) -> tuple[Liveness, str]:
    """A direct get's answer (its headers) as a verdict, and why when it is not a record."""
    h = headers or {}
    status = str(h.get("Status") or "")
    if status == "404":
        return Liveness.ORPHANED, "no record"
    if status:  # 408 (the server's own timeout), 400, 503...: not an answer about the key
        return Liveness.UNCHECKED, f"status {status}"
    if (ended := _ENDED.get(str(h.get("KV-Operation") or ""))) is not None:
        return Liveness.ORPHANED, ended
    return Liveness.LIVE, ""


Request = Callable[[str, float], Awaitable[Any]]  # (subject, timeout_s) -> the reply (nats Msg)


@dataclass(frozen=True, slots=True)
class Check:
    liveness: Liveness
    why: str = ""  # for a log line: what the read said (orphaned) or how it failed
    cached: bool = False
    state: str = ""  # a live record's state (attached, detached); "" when not known (Rule 5)
    gateway: str = ""  # the gateway a live record names
    written_unix: float = 0.0  # when the record was last written (0: not known)


class SessionLiveness:
    """The verdicts of one worker, remembered per session for ``ttl_s``.

    Args:
        request: sends one request (nats-py's ``nc.request`` bound to a subject and timeout).
        timeout_s: the bound of one read.
        ttl_s: how long a verdict is reused (Rule 4).
        max_sessions: how many verdicts are kept.
        window_s: the resume window; a record not written for longer is an orphan's (Rule 6;
            0: no such check).
        clock: monotonic clock (injectable for tests).
        wall_clock: Unix time, as the gateways write it in records (injectable for tests).
    """

    def __init__(
        self,
        request: Request,
        timeout_s: float,
        *,
        ttl_s: float = 1.0,
        max_sessions: int = 1024,
        window_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._request = request
        self._timeout_s = timeout_s
        self._ttl_s = ttl_s
        self._max = max_sessions
        self._clock = clock
        self._window_s = window_s
        self._wall_clock = wall_clock
        self._seen: OrderedDict[str, tuple[float, Check]] = OrderedDict()

    async def check(self, session_id: str) -> Check:
        return self._aged(await self._remembered(session_id))

    def _aged(self, check: Check) -> Check:
        """Rule 6: a live record not written for the whole window is an orphan's."""
        if check.liveness != Liveness.LIVE or not (self._window_s and check.written_unix):
            return check
        age = self._wall_clock() - check.written_unix
        if age <= self._window_s:
            return check
        why = f"record not written for {age:.1f} s, past the {self._window_s:.0f} s window"
        return Check(Liveness.ORPHANED, why, check.cached)

    async def _remembered(self, session_id: str) -> Check:
        now = self._clock()
        hit = self._seen.get(session_id)
        if hit is not None and now < hit[0]:
            return dataclasses.replace(hit[1], cached=True)
        result = await self._read(session_id)
        # Failures too: with NATS slow, a burst of one session's chunks pays one timeout, not
        # one each.
        self._seen[session_id] = (self._clock() + self._ttl_s, result)
        self._seen.move_to_end(session_id)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)
        return result

    async def _read(self, session_id: str) -> Check:
        if not _KEY.fullmatch(session_id):
            # Not a key the worker may ask for (nor one a gateway makes): cannot tell.
            return Check(Liveness.UNCHECKED, "session id is not a record key")
        try:
            reply = await self._request(direct_get_subject(session_id), self._timeout_s)
        except nats.errors.NoRespondersError:
            return Check(Liveness.NO_BUCKET, f"no {SESSIONS_BUCKET} bucket answers direct gets")
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            return Check(Liveness.UNCHECKED, repr(exc))
        liveness, why = verdict(reply.headers)
        if liveness != Liveness.LIVE:
            return Check(liveness, why)
        try:
            record = SessionRecord.from_json(bytes(reply.data or b""))
        except MessageError:
            return Check(liveness, why)  # state unknown: decoded as before (Rule 5)
        return Check(
            liveness,
            why,
            state=record.state,
            gateway=record.gateway,
            written_unix=record.updated_unix,
        )
