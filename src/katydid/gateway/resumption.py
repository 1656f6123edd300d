"""Sessions that outlive their connection, the hall's part: the resume token, the records of
resumable sessions kept in NATS (``session_record.py``), and taking a session over when its
client comes back, to this gateway or any other.

Rule 1: a session never waits on NATS for its record: writes are queued, coalesced per session
(only the newest state of a session is written), and written by one task (``run``), bounded.
Rule 2: an attached session's record is written again every quarter of ``resume_window_s``, so
it outlives its window only when nobody serves it any more (its client, or its gateway, gone).
Rule 3: a connection writes its session's record only over the revision it wrote last (a
compare-and-set in the KV bucket): once another connection (here or on another gateway) took the
session over, the older one's writes, its detach and its end fail, and it hears it was taken.
Rule 4: a final's record (its chunk counted, its audio in jobs) is written before its job is
published, and a resume takes the record over with a compare-and-set on the revision it read:
so a resumed connection never cuts, under a seq, audio another connection already published
under it (their jobs would share a Nats-Msg-Id: the newer one dropped as a duplicate, the words
after the older one's end lost).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog
import trio

from katydid.bus import JobBus
from katydid.config import Config
from katydid.errors import ErrorCode, NatsError, ProtocolError
from katydid.gateway.events import ServerEvent
from katydid.gateway.live import Live, clock
from katydid.gateway.outputs import Output, Reattach, Send
from katydid.gateway.session_resume import TAKEN
from katydid.gateway.tenants import Tenants
from katydid.log import SampledLogger
from katydid.metrics import GatewayMetrics
from katydid.session_record import ATTACHED, DETACHED, SessionRecord, turn_ahead

log = structlog.get_logger("katydid.gateway")
_TAKEN = -1  # a revision no write goes over: another connection took the session
_TAKEOVER_TRIES = 3  # a resume reads the record again if it changed before it took it over
_RECORD_RETRY_S = 1.0  # between two tries of a record NATS did not take (bounded: publish_retry_s)


@dataclass(slots=True)
class _Held:
    """A session a connection of this gateway wrote the record of."""

    owner: str
    revision: int | None  # the last written (None: the next write is over whatever is stored)
    until: float = math.inf  # detached or taken: forgotten after the window (trio time)


class Resumption:
    def __init__(
        self,
        cfg: Config,
        bus: JobBus,
        gateway_id: str,
        sessions: dict[str, Live],
        tenants: Tenants,
        sampled: SampledLogger,
        metrics: GatewayMetrics,
    ) -> None:
        self.cfg = cfg
        self.bus = bus
        self.gateway_id = gateway_id
        self.sessions = sessions  # the hub's, by session id
        self.tenants = tenants
        self.sampled = sampled
        self.enabled = cfg.resume_window_s > 0
        # Session id -> what to write (None: delete) and the connection (owner) it is from
        self._pending: dict[str, tuple[SessionRecord | None, str]] = {}
        # Session id -> the connection that holds it here and the revision it wrote last
        self._owners: dict[str, _Held] = {}
        self._locks: dict[str, trio.Lock] = {}  # sessions being written: one write at a time
        # Told (session id, owner) when a write finds another connection took the session
        self.on_taken: Callable[[str, str], None] = lambda _s, _o: None
        self._unfollow: list[str] = []  # resumed sessions over: stop reading their results
        self.followed: set[str] = set()  # resumed here: their finals come from the stream
        self._wake = trio.Event()
        self.events = metrics.resumption  # by event: detached, resumed, taken_over, ...

    # --- tokens ---

    def token(self, session_id: str) -> str:
        """What proves a client may resume ``session_id``: an HMAC under the deployment's
        secret (every gateway of it has the same), so any gateway can check it, and nobody
        without the secret can make one."""
        mac = hmac.new(self.bus.secret, b"resume:" + session_id.encode(), hashlib.sha256)
        return mac.hexdigest()[:32]

    def opened(self, live: Live, *, resumable: bool) -> None:
        """A new session: it keeps a record, with this connection as its owner; ``resumable``
        (a native one): also its token, and it waits for its client if the connection drops."""
        if not self.enabled:
            return
        live.owner = f"{self.gateway_id}:{uuid.uuid4().hex[:8]}"
        live.session.kept = True
        if resumable:
            live.session.resumable = True
            live.session.resume_token = self.token(live.session.session_id)

    # --- records ---

    def remember(self, live: Live, state: str) -> None:
        """The session's record as of now, to write (queued; the newest state wins)."""
        s = live.session
        if not s.kept or s.options is None:
            return
        key = live.tenant.name if live.tenant is not None else ""
        record = s.record(state, self.gateway_id, live.owner, key, time.time())
        self._queue(s.session_id, record, live.owner)
        if state == DETACHED:
            self.events.labels("detached").inc()

    async def recorded(self, live: Live, *, final: bool) -> ProtocolError | None:
        """Before a session's job is published: its record is written and acknowledged, so no
        worker finds a job before its record (and skips it as an orphan), and a final's record
        holds that job's chunk before the job exists (a connection that resumes the session
        never cuts a chunk another connection published: Rule 4). None once written; a record
        NATS does not take is the session's ``overloaded``; one another connection took over is
        ``session_taken`` (the job is not published)."""
        s = live.session
        if not s.kept or s.options is None or (live.recorded and not final):
            return None
        key = live.tenant.name if live.tenant is not None else ""
        record = s.record(ATTACHED, self.gateway_id, live.owner, key, time.time())
        # Retried as a job's publish is (``publish_retry_s``): a cluster electing the
        # bucket's leader does not answer for seconds (4.5-9 s, a local 3-node cluster on a
        # 2-core AMD EPYC), and a session that
        # started then would be told `overloaded` for it.
        deadline = trio.current_time() + self.cfg.publish_retry_s
        while True:
            try:
                with trio.fail_after(self.cfg.nats_request_timeout_s):
                    written = await self._write(s.session_id, record, live.owner)
                break
            except (NatsError, trio.TooSlowError) as exc:
                if trio.current_time() + _RECORD_RETRY_S >= deadline:
                    return ProtocolError(
                        ErrorCode.OVERLOADED,
                        f"the gateway cannot store the session's record ({exc or 'timed out'})",
                        retry_after_s=5.0,
                    )
            await trio.sleep(_RECORD_RETRY_S)
        if not written:
            return ProtocolError(ErrorCode.SESSION_TAKEN, TAKEN)
        live.recorded = True
        return None

    def forget(self, live: Live) -> None:
        self._queue(live.session.session_id, None, live.owner)

    def ended(self, live: Live) -> None:
        """A session over on this gateway: if it was following its results, no more; if it
        has no write left to make, this gateway holds it no more."""
        session_id = live.session.session_id
        if session_id in self.followed:
            self.followed.discard(session_id)
            self._unfollow.append(session_id)
            self._wake.set()
        held = self._owners.get(session_id)
        if (
            held is not None
            and held.owner == live.owner
            and held.until == math.inf  # (a detached or taken one is kept for its window)
            and session_id not in self._pending
        ):
            del self._owners[session_id]

    def _queue(self, session_id: str, record: SessionRecord | None, owner: str) -> None:
        if session_id not in self._pending and len(self._pending) >= self.cfg.stream_max_msgs:
            self.events.labels("record_dropped").inc()
            self.sampled.warning("session_record_not_written", session_id=session_id)
            return
        self._pending[session_id] = (record, owner)
        self._wake.set()

    async def _write(self, session_id: str, record: SessionRecord | None, owner: str) -> bool:
        """A record (None: its end) from connection ``owner``, over the revision that
        connection wrote last; a write of a connection that no longer holds the session here is
        dropped, and one that finds another connection's revision tells ``on_taken``. One write
        of a session at a time (the first record, written before its first job, and the queued
        ones would otherwise both write over the same revision, and one would fail)."""
        async with self._writing(session_id):
            return await self._write_now(session_id, record, owner)

    @asynccontextmanager
    async def _writing(self, session_id: str) -> AsyncIterator[None]:
        """The session's record is this task's to write until the block ends: its connections'
        writes and a resume's takeover, one at a time."""
        lock = self._locks.get(session_id)
        if lock is None:
            lock = self._locks[session_id] = trio.Lock()
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(session_id, None)

    async def _write_now(self, session_id: str, record: SessionRecord | None, owner: str) -> bool:
        """Whether it was written (False: not this connection's to write any more)."""
        held = self._owners.get(session_id) or _Held(owner, None)
        if held.owner != owner or held.revision == _TAKEN:
            return False  # an older connection's, here, or one another connection took over
        if record is None:
            self._owners.pop(session_id, None)
            await self.bus.delete_record(session_id, last=held.revision)
            return True
        revision = await self.bus.put_record(record, last=held.revision)
        if revision is None and held.revision is not None:
            # This connection's earlier try may have landed with its answer lost (a timeout):
            # then the stored record is its own, not another connection's.
            found = await self.bus.get_record(session_id)
            if found is not None and found[0].owner == owner:
                revision = await self.bus.put_record(record, last=found[1])
        now_held = self._owners.get(session_id)
        if now_held is not None and now_held.owner != owner:
            return False  # a resume here took it meanwhile: the entry is the newer connection's
        # Detached or taken, the entry is kept for the window: the connection's later writes
        # (a job's publish acknowledged after the drop) go over its own revision, or nowhere.
        later = trio.current_time() + self.cfg.resume_window_s
        if revision is None:
            self._owners[session_id] = _Held(owner, _TAKEN, later)
            self.events.labels("taken_over").inc()
            self.on_taken(session_id, owner)
            return False
        until = later if record.state == DETACHED else math.inf
        self._owners[session_id] = _Held(owner, revision, until)
        return True

    async def run(self) -> None:
        """Write the queued records, and refresh the attached ones, until cancelled."""
        if not self.enabled:
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._refresh)
            nursery.start_soon(self._beat)
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                pending, self._pending = self._pending, {}
                unfollow, self._unfollow = self._unfollow, []
                for session_id in unfollow:
                    if session_id not in self.followed:  # (not resumed here again meanwhile)
                        await self._quietly(self.bus.unfollow_results(session_id))
                for session_id, (record, owner) in pending.items():
                    try:
                        with trio.fail_after(self.cfg.nats_request_timeout_s):
                            await self._write(session_id, record, owner)
                    except (NatsError, trio.TooSlowError) as exc:
                        # The next write of it (or the refresh) tries again.
                        self.sampled.warning(
                            "session_record_write_failed", session_id=session_id, error=str(exc)
                        )

    async def _quietly(self, call: Awaitable[None]) -> None:
        try:
            with trio.fail_after(self.cfg.nats_request_timeout_s):
                await call
        except (NatsError, trio.TooSlowError) as exc:
            self.sampled.warning("results_unfollow_failed", error=str(exc))

    async def _beat(self) -> None:
        """This gateway is alive, every ``gateway_heartbeat_s``: workers that stop hearing it
        set its sessions' jobs aside (their clients may resume them on another gateway) and
        decode live sessions' jobs first."""
        while True:
            try:
                with trio.move_on_after(self.cfg.nats_request_timeout_s):
                    await self.bus.gateway_alive(self.gateway_id)
            except NatsError as exc:
                self.sampled.warning("gateway_heartbeat_failed", error=str(exc))
            await trio.sleep(self.cfg.gateway_heartbeat_s)

    async def _refresh(self) -> None:
        while True:
            await trio.sleep(self.cfg.resume_window_s / 4)
            now = trio.current_time()
            for session_id in [i for i, h in self._owners.items() if h.until < now]:
                del self._owners[session_id]
            for live in list(self.sessions.values()):
                if live.session.kept and not live.session.closed and live.owner:
                    self.remember(live, ATTACHED)

    # --- taking a session over ---

    async def reattach(
        self,
        live: Live,
        ask: Reattach,
        adopt: Callable[[Live, str], None],  # (live, the id it was opened under)
        send: Callable[[ServerEvent], Awaitable[None]],
    ) -> list[Output]:
        """A client resumes session ``ask.session_id`` on ``live``'s connection: check its
        token and key, read the record, make ``live`` the session (``adopt``: the hub's sessions
        by id, an older connection of it told it is taken), tell the client (``resumed``, sent
        here, before any replayed result can be), then follow its results."""
        s = live.session
        opened_as = s.session_id  # the id it was opened under, until it takes the old one
        try:
            record, ahead = await self._take_over(live, ask)
            older = self.sessions.get(record.session_id)
            if older is not None and older is not live and not record.stopped:
                # Its earlier connection is still here (this gateway has not seen it drop):
                # what that one had is newer than its last record.
                heard = max(record.audio_s, older.session.audio_s)
                record = dataclasses.replace(record, audio_s=heard)
            token = self.token(record.session_id)
            outputs = s.reattached(record, ask.after_seq, token, clock(), ahead=ahead)
        except ProtocolError as exc:
            return s.fail(exc)
        adopt(live, opened_as)
        live.recorded = True
        self.events.labels("resumed").inc()
        self.remember(live, ATTACHED)
        first, rest = outputs[0], outputs[1:]
        assert isinstance(first, Send)
        await send(first.event)
        try:
            await self.bus.announce_takeover(record.session_id, live.owner)
            self.followed.add(record.session_id)
            await self.bus.follow_results(record.session_id)
        except NatsError as exc:
            # The session is the client's still: detached, its retry resumes it.
            unreadable = ProtocolError(
                ErrorCode.OVERLOADED,
                f"the gateway cannot read the session's results ({exc})",
                retry_after_s=2.0,
            )
            return s.step_aside(unreadable) or s.fail(unreadable)
        # Sampled: a client can resume as often as it likes (one line each was a log storm).
        self.sampled.info("session_resumed", session_id=record.session_id, after_seq=ask.after_seq)
        return rest

    async def _take_over(self, live: Live, ask: Reattach) -> tuple[SessionRecord, bool]:
        """The session's record, taken over by ``live``'s connection: written as its own over
        the revision read (Rule 4: had another connection written it since, say to hold a chunk
        it was publishing, the record read would be stale; read again, a few times); and
        whether its first partial may go ahead of the queue (``turn_ahead``: the
        turn is in the record, so it holds across gateways).

        Raises:
            ProtocolError: as ``_record_for``; ``overloaded`` if it kept changing.
        """
        async with self._writing(ask.session_id):
            # An earlier connection's write still queued here (its "detached", with all the
            # audio it had) goes first: the takeover reads what that connection last knew.
            queued = self._pending.pop(ask.session_id, None)
            if queued is not None:
                with contextlib.suppress(NatsError, trio.TooSlowError):
                    with trio.fail_after(self.cfg.nats_request_timeout_s):
                        await self._write_now(ask.session_id, *queued)
            return await self._take_over_now(live, ask)

    async def _take_over_now(self, live: Live, ask: Reattach) -> tuple[SessionRecord, bool]:
        for _ in range(_TAKEOVER_TRIES):
            record, revision = await self._record_for(live, ask)
            unix_now = time.time()
            every = self.cfg.resume_first_partial_every_s
            ahead_after = turn_ahead(record, unix_now, every)
            if ahead_after is not None:
                record = dataclasses.replace(record, ahead_after_unix=ahead_after)
            mine = dataclasses.replace(
                record,
                state=ATTACHED,
                gateway=self.gateway_id,
                owner=live.owner,
                updated_unix=unix_now,
            )
            try:
                with trio.fail_after(self.cfg.nats_request_timeout_s):
                    written = await self.bus.put_record(mine, last=revision)
            except (NatsError, trio.TooSlowError) as exc:
                raise ProtocolError(
                    ErrorCode.OVERLOADED,
                    f"the session store is unreachable ({exc or 'timed out'})",
                    retry_after_s=2.0,
                ) from None
            if written is not None:
                self._owners[record.session_id] = _Held(live.owner, written)
                return record, ahead_after is not None
        raise ProtocolError(
            ErrorCode.OVERLOADED,
            "the session kept changing while it was being resumed: try again",
            retry_after_s=0.5,
        )

    async def _record_for(self, live: Live, ask: Reattach) -> tuple[SessionRecord, int]:
        """The record of the session ``ask`` names, if the client may have it.

        Raises:
            ProtocolError: ``unauthorized`` (token or key), ``resume_expired``, or
                ``overloaded`` (NATS unreachable).
        """
        if not self.enabled:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "this server does not resume sessions")
        if not hmac.compare_digest(ask.token.encode(), self.token(ask.session_id).encode()):
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "wrong resume token for the session")
        try:
            with trio.fail_after(self.cfg.nats_request_timeout_s):
                found = await self.bus.get_record(ask.session_id)
        except (NatsError, trio.TooSlowError) as exc:
            raise ProtocolError(
                ErrorCode.OVERLOADED, f"the session store is unreachable ({exc})", retry_after_s=2.0
            ) from None
        if found is None:
            raise ProtocolError(
                ErrorCode.RESUME_EXPIRED,
                "no such session to resume: it ended, or was not resumed within"
                f" {self.cfg.resume_window_s:.0f} s",
            )
        record = found[0]
        if self.tenants.required:
            tenant = self.tenants.authenticate(live.credential or ask.api_key, live.door)
            if tenant.name != record.key:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "another key started the session")
            self.tenants.open(tenant, clock())
            live.tenant = tenant
        return found
