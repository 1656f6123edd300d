"""Jobs nobody wants any more leave the queue: the unanswered jobs of sessions that ended
(deleted from the stream, and a cancel announced for the ones workers already hold), and jobs
JetStream gave up on. Done by two tasks, so a session that ends never waits on NATS.

Rule 1: bounded: at most what the stream itself may hold is waiting; past that, a job left in
the stream is logged (sampled), never a crash.
Rule 2: at shutdown the gateway waits (bounded) until the queued work is done (``done``), before
the bus closes.
"""

from __future__ import annotations

import structlog
import trio

from katydid.bus import JobBus
from katydid.config import Config
from katydid.errors import NatsError
from katydid.gateway.outputs import CancelJobs
from katydid.log import SampledLogger

log = structlog.get_logger("katydid.gateway")


class JobCleanup:
    def __init__(self, bus: JobBus, cfg: Config, sampled: SampledLogger) -> None:
        self.bus = bus
        self.cfg = cfg
        self.sampled = sampled
        self._delete_send, self._delete_recv = trio.open_memory_channel[int](cfg.stream_max_msgs)
        self._cancel_send, self._cancel_recv = trio.open_memory_channel[str](cfg.stream_max_msgs)
        self._pending = 0  # deletions and cancels queued, not yet done
        self._idle = trio.Event()

    def cancel(self, cancel: CancelJobs) -> None:
        """A session ended with jobs unanswered: they leave the work queue now (a worker that
        never heard the cancel would transcribe them for nobody, and they would take stream
        space until then); the cancel stops the ones workers already hold."""
        for stream_seq in cancel.stream_seqs:
            self.delete(stream_seq)
        try:
            self._cancel_send.send_nowait(cancel.session_id)
        except trio.WouldBlock:
            self.sampled.warning("cancel_not_announced", session_id=cancel.session_id)
            return
        self._pending += 1

    def delete(self, stream_seq: int) -> None:
        try:
            self._delete_send.send_nowait(stream_seq)
        except trio.WouldBlock:
            self.sampled.warning("job_left_in_stream", stream_seq=stream_seq)
            return
        self._pending += 1

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._delete_jobs)
            nursery.start_soon(self._announce_cancels)

    async def done(self, timeout_s: float) -> None:
        """Until every queued deletion and cancel is done (or ``timeout_s``)."""
        with trio.move_on_after(timeout_s) as scope:
            while self._pending:
                self._idle = trio.Event()
                await self._idle.wait()
        if scope.cancelled_caught:
            log.warning("shutdown_cleanup_unfinished", jobs=self._pending)

    def _finished_one(self) -> None:
        self._pending -= 1
        if not self._pending:
            self._idle.set()

    async def _delete_jobs(self) -> None:
        async for stream_seq in self._delete_recv:
            try:
                if await self.bus.delete_job(stream_seq):
                    self.sampled.info("job_deleted", stream_seq=stream_seq)
            except NatsError as exc:
                self.sampled.warning("job_delete_failed", stream_seq=stream_seq, error=str(exc))
            finally:
                self._finished_one()

    async def _announce_cancels(self) -> None:
        async for session_id in self._cancel_recv:
            try:
                with trio.move_on_after(self.cfg.nats_request_timeout_s):
                    await self.bus.publish_cancel(session_id)
            except NatsError as exc:
                self.sampled.warning("cancel_publish_failed", error=str(exc))
            finally:
                self._finished_one()
