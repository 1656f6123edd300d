"""The load tester: virtual clients over real WebSockets, with backoff, a drain, and a timeline.

Each virtual client loops: connect, send a clip, wait for its finals and ``done``, repeat, until
the duration ends; sessions in flight then get ``drain_s`` to finish and are counted, not
abandoned. A refused attempt (``overloaded``, or a failed connect) waits per the RetryPolicy,
honouring the server's ``retry_after_s``, for a bounded number of attempts.

Rule 1: every loop here is bounded in count or time: sessions by the duration, attempts by the
policy, each session by ``session_timeout_s`` and the drain deadline.
"""

from __future__ import annotations

import os
import random
import resource
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from katydid import client
from katydid.load.backoff import RetryPolicy
from katydid.metrics import parse_text, total


@dataclass(frozen=True, slots=True)
class ClipData:
    name: str
    data: bytes  # a container file, or PCM s16le 16 kHz mono for streaming
    fmt: str
    audio_s: float


@dataclass(frozen=True, slots=True)
class LoadSpec:
    url: str
    clips: Sequence[ClipData]
    mode: str = "short"  # short | stream | long
    concurrency: int = 10
    duration_s: float = 10.0
    ramp_s: float = 0.0
    session_timeout_s: float = 900.0
    connect_timeout_s: float = 10.0  # TCP connect, then the WebSocket handshake, each
    drain_s: float = 300.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    metrics_url: str | None = None
    max_wait_s: float | None = None
    api_key: str | None = field(default=None, repr=False)  # sent in start (a keyed server)
    seed: int = 0
    drop_rate: float = 0.0  # fraction of sessions whose connection the client resets once
    partials: bool = False  # the sessions ask for partial results (a live client's feedback)


@dataclass(slots=True)
class SessionRecord:
    started_s: float  # since the load began
    attempts: int
    outcome: str  # ok | error kind
    connect_s: float = 0.0
    first_final_s: float | None = None
    total_s: float = 0.0
    queue_s: float = 0.0
    audio_s: float = 0.0
    finished_s: float = 0.0
    status_updates: int = 0  # `queued` events received while waiting
    clip: str = ""  # the clip's name
    # --drop-rate: whether the session's connection was reset, the resumes that followed, and
    # what the finals looked like after them (each must be 0: lost, duplicated, out of order)
    dropped: bool = False
    resumes: int = 0
    finals_lost: int = 0
    finals_duplicated: int = 0
    finals_out_of_order: int = 0
    resume_latencies_s: list[float] = field(default_factory=list)
    resume_first_kinds: list[str] = field(default_factory=list)
    outage_to_final_s: list[float] = field(default_factory=list)


@dataclass(slots=True)
class LoadStats:
    spec: LoadSpec
    records: list[SessionRecord] = field(default_factory=list)
    attempts: int = 0
    overloaded: int = 0
    errors_by_code: Counter[str] = field(default_factory=Counter)
    errors_by_kind: Counter[str] = field(default_factory=Counter)
    not_retried_after_end: int = 0
    active: int = 0
    peak_active_client: int = 0
    timeline: list[dict[str, float]] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def completed(self) -> int:
        return sum(1 for r in self.records if r.outcome == "ok")

    @property
    def errors(self) -> int:
        return sum(self.errors_by_kind.values())


def _classify(res: client.SessionResult) -> tuple[str, str | None, float | None]:
    """(outcome, error code, retry_after_s) of a finished session."""
    if res.done is not None:
        return "ok", None, None
    err = res.error
    if err is not None:
        code = str(err.get("code", "unknown"))
        retry = err.get("retry_after_s")
        return (
            ("overloaded" if code == "overloaded" else "protocol_error"),
            code,
            float(retry) if retry else None,
        )
    return "closed_unexpectedly", None, None


class LoadRunner:
    def __init__(
        self,
        spec: LoadSpec,
        *,
        on_tick: Callable[[LoadStats, dict[str, float]], None] | None = None,
    ) -> None:
        self.spec = spec
        self.stats = LoadStats(spec)
        self._on_tick = on_tick
        self._t0 = 0.0

    def _now(self) -> float:
        return time.monotonic() - self._t0

    async def run(self) -> LoadStats:
        spec = self.spec
        self._t0 = time.monotonic()
        end = trio.current_time() + spec.duration_s
        drain_deadline = end + spec.drain_s
        async with trio.open_nursery() as outer:
            outer.start_soon(self._sample_forever)
            async with trio.open_nursery() as clients:
                clients.cancel_scope.deadline = drain_deadline
                for i in range(spec.concurrency):
                    delay = spec.ramp_s * i / max(1, spec.concurrency)
                    clients.start_soon(self._virtual_client, i, delay, end)
            outer.cancel_scope.cancel()
        await self._sample()  # a last point after everything finished
        self.stats.wall_s = self._now()
        return self.stats

    async def _virtual_client(self, index: int, delay_s: float, end: float) -> None:
        spec = self.spec
        rng = random.Random(spec.seed * 100_003 + index)
        await trio.sleep(delay_s)
        n = index
        while trio.current_time() < end:
            clip = spec.clips[n % len(spec.clips)]
            n += 1
            pause = await self._session(clip, rng, end)
            # A session that failed (or gave up) is followed by a wait, never by an immediate
            # new attempt: no spin loop, even across sessions; none starts after the end.
            if pause:
                if trio.current_time() + pause >= end:
                    return
                await trio.sleep(pause)

    async def _session(self, clip: ClipData, rng: random.Random, end: float) -> float:
        """One session, retried per the policy; returns the wait before the client's next one."""
        spec, st = self.spec, self.stats
        record = SessionRecord(
            started_s=self._now(),
            attempts=0,
            outcome="pending",
            audio_s=clip.audio_s,
            clip=clip.name,
        )
        st.records.append(record)
        options: dict[str, Any] = {}
        if spec.max_wait_s is not None:
            options["max_wait_s"] = spec.max_wait_s
        if spec.api_key:
            options["api_key"] = spec.api_key
        if spec.partials:
            options["partials"] = True
        fault = None
        if spec.drop_rate > 0 and rng.random() < spec.drop_rate:
            fault = self._drop_once(
                record, trio.current_time() + rng.uniform(0.1, 0.9) * self._life_s(clip)
            )
        while True:
            record.attempts += 1
            st.attempts += 1
            retry_after: float | None = None
            st.active += 1
            st.peak_active_client = max(st.peak_active_client, st.active)
            try:
                res = await client.transcribe(
                    spec.url,
                    clip.data,
                    fmt=clip.fmt,
                    frame_bytes=3200 if clip.fmt == "pcm_s16le" else 65_536,
                    realtime=spec.mode == "stream",
                    options=options,
                    session_timeout_s=spec.session_timeout_s,
                    connect_timeout_s=spec.connect_timeout_s,
                    fault=fault,
                )
            except client.ClientError as exc:
                outcome, code = exc.kind, None
                if exc.result is not None:
                    record.resumes += exc.result.resumes
            except trio.Cancelled:
                record.outcome = "drain_timeout"
                st.errors_by_kind["drain_timeout"] += 1
                raise
            else:
                outcome, code, retry_after = _classify(res)
                if outcome == "ok":
                    record.outcome = "ok"
                    record.connect_s = res.connect_s
                    record.first_final_s = res.first_final_s
                    record.total_s = res.total_s
                    record.queue_s = max(
                        (float(f.get("queue_s", 0.0)) for f in res.finals), default=0.0
                    )
                    record.finished_s = self._now()
                    record.status_updates = len(res.queued)
                    record.resumes += res.resumes
                    record.finals_lost = len(res.lost_seqs)
                    record.finals_duplicated = res.duplicates
                    record.finals_out_of_order = res.out_of_order
                    record.resume_latencies_s = res.resume_latencies_s
                    record.resume_first_kinds = res.resume_first_kinds
                    record.outage_to_final_s = res.outage_to_final_s
                    return 0.0
            finally:
                st.active -= 1
            if outcome == "overloaded":
                st.overloaded += 1
            retryable = outcome in (
                "overloaded",
                "connect_refused",
                "connect_timeout",
                "handshake_timeout",
                "handshake_failed",
            )
            if not retryable or not spec.retry.may_retry(record.attempts):
                record.outcome = outcome if outcome != "overloaded" else "overloaded_gave_up"
                record.finished_s = self._now()
                st.errors_by_kind[record.outcome] += 1
                if code:
                    st.errors_by_code[code] += 1
                return spec.retry.delay_s(record.attempts, retry_after_s=retry_after, rng=rng)
            wait = spec.retry.delay_s(record.attempts, retry_after_s=retry_after, rng=rng)
            if trio.current_time() + wait >= end:
                record.outcome = "not_retried_after_end"
                st.not_retried_after_end += 1
                return wait
            await trio.sleep(wait)

    def _life_s(self, clip: ClipData) -> float:
        """How long a session of ``clip`` is expected to last, for a drop to land inside it: a
        stream lasts its audio; a file as long as the median session so far (a quarter of its
        audio before any finished)."""
        if self.spec.mode == "stream":
            return clip.audio_s
        totals = sorted(r.total_s for r in self.stats.records if r.outcome == "ok")
        return totals[len(totals) // 2] if totals else clip.audio_s / 4

    @staticmethod
    def _drop_once(record: SessionRecord, at: float) -> Callable[[client.Link], Awaitable[None]]:
        """A fault for ``client.transcribe``: at ``at`` (trio time), reset the connection then
        open, once (no close frame: the server must keep the session for its resume)."""

        async def fault(link: client.Link) -> None:
            if record.dropped:
                return
            await trio.sleep_until(at)
            record.dropped = True
            await link.abort()

        return fault

    async def _sample_forever(self) -> None:
        while True:
            await self._sample()
            await trio.sleep(1.0)

    async def _sample(self) -> None:
        st = self.stats
        point: dict[str, float] = {
            "t": round(self._now(), 2),
            "active_client": st.active,
            "completed": st.completed,
            "errors": st.errors,
            "overloaded": st.overloaded,
            "audio_done_s": round(sum(r.audio_s for r in st.records if r.outcome == "ok"), 2),
            "loader_cpu_s": _own_cpu_s(),
        } | host_cpu_s()
        if self.spec.metrics_url:
            try:
                text = await trio.to_thread.run_sync(_fetch, self.spec.metrics_url)
            except OSError:
                text = ""
            m = parse_text(text)
            if m:
                point |= {
                    "gateway_active": m.get("katydid_active_connections", 0.0),
                    "gateway_peak": m.get("katydid_peak_connections", 0.0),
                    "queue_depth": total(m, "katydid_queue_depth"),
                    "gateway_cpu_s": m.get("process_cpu_seconds_total", 0.0),
                    "gateway_rss": m.get("process_resident_memory_bytes", 0.0),
                    "gateway_log_lines": total(m, "katydid_log_lines_total"),
                    "gateway_log_suppressed": m.get("katydid_log_lines_suppressed_total", 0.0),
                    "workers_cpu_s": total(m, "katydid_worker_cpu_seconds_total"),
                    "workers_rss": total(m, "katydid_worker_resident_memory_bytes"),
                    "workers_live": m.get("katydid_workers_live", 0.0),
                }
        st.timeline.append(point)
        if self._on_tick is not None:
            self._on_tick(st, point)


def _own_cpu_s() -> float:
    """This process's CPU seconds (every thread): what the load generator took from the host."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 3)


def host_cpu_s(stat: str = "/proc/stat") -> dict[str, float]:
    """The whole host's CPU seconds so far, all cores: busy (user, nice, system, irq, softirq) and
    steal (time this VM was ready to run and the hypervisor ran someone else). Empty where there
    is no ``/proc/stat``. With the gateway's, the workers' and the load generator's own figures,
    they say where the CPU that inference did not get went.
    """
    try:
        with open(stat, encoding="ascii") as f:
            fields = f.readline().split()
    except OSError:
        return {}
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return {}
    ticks = [int(x) for x in fields[1:9]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return {
        "host_busy_s": round((user + nice + system + irq + softirq) / hz, 2),
        "host_steal_s": round(steal / hz, 2),
    }


def _fetch(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as resp:
        body: bytes = resp.read()
        return body.decode()
