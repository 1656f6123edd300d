"""Who a session belongs to, and what its key may still do: authentication, quotas, fair share.

Without a keys file (``api_keys_file`` empty) the gateway is open and none of this applies. With
one, every session needs a valid key before it is admitted (a door that cannot carry one, such as
Wyoming, vouches for its sessions by network allowlist instead). The quotas are this gateway's:
with several gateways, a key's bounds add up over them.

Rule 1: a refusal is a coded error (``unauthorized``, ``quota_exceeded`` with ``retry_after_s``),
never a wall: a key over its share of the queue is seated, not refused.
Rule 2: fair share by counting, not scanning: each session's jobs in the stream are counted into
its key as the session changes (``recount``), so a check is O(1) however many sessions a key
has.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
import trio

from katydid.errors import ErrorCode, ProtocolError
from katydid.keys import KeyFile, KeyRecord
from katydid.log import SampledLogger
from katydid.metrics import GatewayMetrics

if TYPE_CHECKING:
    from pathlib import Path

_log = structlog.get_logger("katydid.gateway")
_BUCKET_S = 60.0  # the audio budget is counted per minute, over the last hour
_HOUR_S = 3600.0


@dataclass(slots=True)
class AudioBudget:
    """Audio seconds used in the last hour, in one-minute buckets (at most 61 of them)."""

    buckets: deque[tuple[float, float]] = field(default_factory=deque)  # (minute start, s)

    def _expire(self, now: float) -> None:
        while self.buckets and self.buckets[0][0] + _BUCKET_S <= now - _HOUR_S:
            self.buckets.popleft()

    def used(self, now: float) -> float:
        self._expire(now)
        return sum(s for _, s in self.buckets)

    def add(self, seconds: float, now: float) -> None:
        self._expire(now)
        minute = math.floor(now / _BUCKET_S) * _BUCKET_S
        if self.buckets and self.buckets[-1][0] == minute:
            self.buckets[-1] = (minute, self.buckets[-1][1] + seconds)
        else:
            self.buckets.append((minute, seconds))

    def retry_after_s(self, budget: float, now: float) -> float:
        """When enough of the hour's audio has aged out for the key to be under budget."""
        used = self.used(now)
        for start, seconds in self.buckets:
            used -= seconds
            if used < budget:
                return max(1.0, start + _BUCKET_S + _HOUR_S - now)
        return 1.0


@dataclass(slots=True)
class Tenant:
    """One key's sessions, its jobs in the stream, its audio this hour."""

    name: str
    record: KeyRecord | None  # None: a door's own tenant (no limits)
    sessions: int = 0
    queued: int = 0  # its sessions' jobs in the stream
    publishing: int = 0  # its jobs being published now (seated, not yet acknowledged)
    waiting: int = 0  # its sessions waiting for a seat
    audio: AudioBudget = field(default_factory=AudioBudget)
    seats: trio.lowlevel.ParkingLot = field(default_factory=trio.lowlevel.ParkingLot)

    @property
    def max_queued_jobs(self) -> int | None:
        return self.record.max_queued_jobs if self.record else None

    @property
    def full(self) -> bool:
        """At its share of the stream: its next final waits in the gateway."""
        bound = self.max_queued_jobs
        return bound is not None and self.queued + self.publishing >= bound


class Tenants:
    """The keys file and each key's use of this gateway.

    Raises (at construction): ConfigError for a malformed keys file.
    """

    def __init__(
        self, keys_file: Path | None, metrics: GatewayMetrics, sampled: SampledLogger
    ) -> None:
        self.keys = KeyFile(keys_file) if keys_file is not None else None
        self.metrics = metrics
        self.sampled = sampled
        self._tenants: dict[str, Tenant] = {}

    @property
    def required(self) -> bool:
        return self.keys is not None

    def refresh(self, now: float) -> None:
        """Pick up a changed keys file (called from the queue poll, once a second)."""
        if self.keys is not None:
            self._reloaded(self.keys.refresh(now), "changed")

    def reload(self) -> None:
        """SIGHUP: read the keys file now."""
        if self.keys is not None:
            self._reloaded(self.keys.reload(), "sighup")

    def _reloaded(self, ok: bool | None, why: str) -> None:
        assert self.keys is not None
        if ok is None:
            return
        if not ok:
            self.sampled.log(
                "error", "keys_file_invalid", error=self.keys.last_error, kept="the keys before"
            )
            return
        active = len(self.keys.active_names)
        # Not sampled: rare, and an operator's change must show (a file with no key left
        # refuses everyone: a warning).
        (_log.info if active else _log.warning)(
            "keys_reloaded", why=why, keys=active, revoked=len(self.keys.names) - active
        )

    def authenticate(self, key: str | None, door: str) -> Tenant:
        """The tenant of a presented key.

        Raises:
            ProtocolError: ``unauthorized`` (no key, an unknown or a revoked one).
        """
        assert self.keys is not None
        record = self.keys.lookup(key) if key else None
        if record is None or record.revoked is not None:
            reason = "missing" if key is None else ("revoked" if record else "unknown")
            name = record.name if record else ""
            self.metrics.key_refusals.labels(name, "unauthorized").inc()
            # The name only: never the key, nor any part of it.
            self.sampled.warning("unauthorized", door=door, reason=reason, key_name=name or None)
            # The client hears only "missing" or "not valid"; the log says which (revoked...).
            message = (
                "an API key is required (Authorization: Bearer KEY)"
                if reason == "missing"
                else "this API key is not valid"
            )
            raise ProtocolError(ErrorCode.UNAUTHORIZED, message)
        tenant = self._tenants.get(record.name)
        if tenant is None:
            tenant = self._tenants[record.name] = Tenant(record.name, record)
        tenant.record = record  # limits as the file says now
        return tenant

    def door_tenant(self, door: str) -> Tenant:
        """The tenant of a door that vouches for its sessions itself (no key, no limits)."""
        tenant = self._tenants.get(door)
        if tenant is None:
            tenant = self._tenants[door] = Tenant(door, None)
        return tenant

    def open(self, tenant: Tenant, now: float) -> None:
        """A session of ``tenant`` is admitted.

        Raises:
            ProtocolError: ``quota_exceeded`` (sessions, or the hour's audio), with a retry.
        """
        record = tenant.record
        if record is not None:
            if record.max_sessions is not None and tenant.sessions >= record.max_sessions:
                self._over(tenant, "max_sessions")
                raise ProtocolError(
                    ErrorCode.QUOTA_EXCEEDED,
                    f"key {tenant.name!r} has {tenant.sessions} sessions open, its limit",
                    retry_after_s=5.0,
                )
            self.check_audio(tenant, now)
        tenant.sessions += 1
        self.metrics.key_sessions.labels(tenant.name).inc()

    def close(self, tenant: Tenant) -> None:
        tenant.sessions -= 1

    def check_audio(self, tenant: Tenant, now: float) -> None:
        """Raises: ProtocolError ``quota_exceeded`` once the key's hour of audio is used up."""
        budget = tenant.record.audio_s_per_hour if tenant.record else None
        if budget is not None and tenant.audio.used(now) >= budget:
            self._over(tenant, "audio_s_per_hour")
            raise ProtocolError(
                ErrorCode.QUOTA_EXCEEDED,
                f"key {tenant.name!r} used its {budget:g} s of audio for this hour",
                retry_after_s=round(tenant.audio.retry_after_s(budget, now), 1),
            )

    def charge(self, tenant: Tenant, audio_s: float, now: float) -> None:
        tenant.audio.add(audio_s, now)
        self.metrics.key_audio_seconds.labels(tenant.name).inc(audio_s)

    def _over(self, tenant: Tenant, quota: str) -> None:
        self.metrics.key_refusals.labels(tenant.name, quota).inc()
        self.sampled.warning("quota_exceeded", key_name=tenant.name, quota=quota)

    # --- fair share ---

    def recount(self, tenant: Tenant, before: int, now_queued: int) -> None:
        """A session of ``tenant`` went from ``before`` to ``now_queued`` jobs in the stream."""
        if now_queued == before:
            return
        tenant.queued += now_queued - before
        self.metrics.key_queued_jobs.labels(tenant.name).set(tenant.queued)
        if now_queued < before and tenant.waiting:
            tenant.seats.unpark_all()

    async def seat(self, tenant: Tenant) -> None:
        """Until ``tenant`` is below its share of the stream; then one more of its jobs is being
        published (the caller calls ``unseat`` once the publish is over, however it ended)."""
        tenant.waiting += 1
        try:
            while tenant.full:
                await tenant.seats.park()
        finally:
            tenant.waiting -= 1
        tenant.publishing += 1

    def unseat(self, tenant: Tenant) -> None:
        tenant.publishing -= 1
        if tenant.waiting:
            tenant.seats.unpark_all()
