"""A small client for protocol v1 (used by ``katydid transcribe --url``, tests and the load tester).

Two ways to send: a container file as-is (the gateway decodes it), or raw ``pcm_s16le`` frames,
as fast as allowed or paced in real time like a microphone. Receiving runs concurrently with
sending, so queue updates and finals arrive while audio is still going out.

A connection lost before ``done`` is resumed when the server offers it (``ready.resume_token``):
the client reconnects with backoff, sends a resuming ``start``, the audio the server lacks, and
reads on; every final reaches the caller once and in order. The rules are ``client_resume``'s.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from katydid import client_resume as rs
from katydid.client_conn import ClientError as ClientError
from katydid.client_conn import Link as Link
from katydid.client_conn import SessionResult as SessionResult
from katydid.client_conn import connect as connect
from katydid.client_conn import open_link as open_link
from katydid.client_resume import ResumeOptions as ResumeOptions

# what counts as the first result after a resume: a partial too (a live client's feedback)
_RESULTS = frozenset({"partial", "final", "error", "done"})
# connect failures worth another attempt while resuming (a gateway restarting, a network back)
_RETRY_CONNECT = frozenset(
    {
        "connect_refused",
        "connect_failed",
        "connect_timeout",
        "handshake_timeout",
        "handshake_failed",
    }
)


@dataclass(frozen=True, slots=True)
class _Outcome:
    kind: str  # done | ended (for good) | lost (resumable) | retry (a resume attempt failed)
    why: str = ""
    retry_after_s: float | None = None
    error: ClientError | None = None  # raised once out of the nurseries


async def transcribe(
    url: str,
    audio: bytes,
    *,
    fmt: str = "pcm_s16le",
    sample_rate: int = 16_000,
    channels: int = 1,
    frame_bytes: int = 3200,
    realtime: bool = False,
    options: dict[str, Any] | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    connect_timeout_s: float = 10.0,
    session_timeout_s: float = 900.0,
    send_stop: bool = True,
    resume: ResumeOptions | None = None,
    on_status: Callable[[str], None] | None = None,
    fault: Callable[[Link], Awaitable[None]] | None = None,
    fallback_urls: Sequence[str] = (),
) -> SessionResult:
    """Run one session: start, audio frames, stop; collect events until ``done`` or close.

    Args:
        url: ``ws://host:port``.
        audio: PCM bytes (``fmt="pcm_s16le"``) or a whole container file.
        frame_bytes: bytes per binary frame (3200 = 100 ms of 16 kHz mono PCM).
        realtime: pace PCM frames at their duration, like a microphone.
        options: extra ``start`` fields (language, partials, max_wait_s, ...).
        on_event: called with each server event as it arrives (each final once, in order).
        send_stop: False leaves the stream open (for tests of abandoned sessions).
        resume: how a lost connection is resumed (default ``ResumeOptions()``: on).
        on_status: told ``"reconnecting"`` when a connection is lost and ``"resumed"`` when the
            session is back.
        fault: run beside each connection (cancelled when it ends): the load tester's way to
            cut one (``Link.abort``) at a moment of its choosing.
        fallback_urls: other gateways of the same deployment: reconnect attempts go to
            ``[*fallback_urls, url]`` in turn (any gateway resumes a session, so a client whose
            gateway died need not wait for it to come back).

    Raises:
        ClientError: connect or handshake failure, the session timed out, or a lost connection
            could not be resumed (``ClientError.result``: what had arrived).
    """
    session = _Session(
        url, audio, fmt=fmt, sample_rate=sample_rate, channels=channels,
        frame_bytes=frame_bytes, realtime=realtime, options=options or {}, on_event=on_event,
        connect_timeout_s=connect_timeout_s, send_stop=send_stop,
        resume=resume or ResumeOptions(), on_status=on_status, fault=fault,
        fallback_urls=fallback_urls,
    )  # fmt: skip
    with trio.CancelScope() as scope:
        session.session_scope = scope
        session.session_timeout_s = session_timeout_s
        await session.run()
    if scope.cancelled_caught:
        raise ClientError(
            "session_timeout",
            f"session did not finish within {session_timeout_s:.0f} s",
            session.result,
        )
    session.result.total_s = time.monotonic() - session.started
    return session.result


class _Session:
    def __init__(
        self,
        url: str,
        audio: bytes,
        *,
        fmt: str,
        sample_rate: int,
        channels: int,
        frame_bytes: int,
        realtime: bool,
        options: dict[str, Any],
        on_event: Callable[[dict[str, Any]], None] | None,
        connect_timeout_s: float,
        send_stop: bool,
        resume: ResumeOptions,
        on_status: Callable[[str], None] | None,
        fault: Callable[[Link], Awaitable[None]] | None,
        fallback_urls: Sequence[str],
    ) -> None:
        self.url, self.audio, self.fmt = url, audio, fmt
        self.urls = [url, *fallback_urls]
        self.sample_rate, self.channels, self.frame_bytes = sample_rate, channels, frame_bytes
        self.paced = realtime and fmt == "pcm_s16le"
        self.start = {
            "type": "start", "format": fmt, "sample_rate": sample_rate, "channels": channels,
            **options,
        }  # fmt: skip
        self.api_key: str | None = options.get("api_key")
        self.on_event, self.on_status, self.fault = on_event, on_status, fault
        self.connect_timeout_s, self.send_stop, self.resume = connect_timeout_s, send_stop, resume
        self.bytes_per_s = 2 * channels * sample_rate
        self.result = SessionResult()
        self.state = rs.ResumeState()
        self.started = time.monotonic()
        self.session_scope = trio.CancelScope()
        self.session_timeout_s = 900.0
        self.t0: float | None = None  # when paced audio began: the microphone's clock
        self.reconnecting = False  # lost, and not resumed yet
        self.lost_at: float | None = None  # trio time of the loss no final has followed yet
        # trio time the connection that resumed was opened, until the first result after it
        self.reconnected_at: float | None = None
        self.rng = random.Random()

    def _status(self, what: str) -> None:
        if self.on_status is not None:
            self.on_status(what)

    async def run(self) -> None:
        """Connections until ``done`` or the end; a loss resumed within ``reconnect_s``."""
        attempts = 0
        deadline = 0.0  # of the outage being resumed
        while True:
            timeout, url = self.connect_timeout_s, self.url
            if self.reconnecting:
                timeout = min(timeout, max(0.05, deadline - trio.current_time()))
                url = self.urls[attempts % len(self.urls)]  # the first retry: the first fallback
            try:
                async with open_link(url, connect_timeout_s=timeout) as link:
                    if not self.result.connect_s:
                        self.result.connect_s = time.monotonic() - self.started
                        self.session_scope.deadline = trio.current_time() + self.session_timeout_s
                    outcome = await self._converse(link, deadline)
            except ClientError as exc:
                if not self.reconnecting or exc.kind not in _RETRY_CONNECT:
                    raise
                outcome = _Outcome("retry", str(exc))
            if outcome.error is not None:
                outcome.error.result = self.result
                raise outcome.error
            if outcome.kind in ("done", "ended"):
                return
            if outcome.kind == "lost":
                if not (self.resume.enabled and self.state.resumable):
                    return  # as before resumption: the caller sees the close code
                # A new outage (the first, or one after a resume): a fresh budget. The latency
                # runs from the first loss that no result has followed yet.
                now = trio.current_time()
                self.reconnecting = True
                self.lost_at = now if self.lost_at is None else self.lost_at
                deadline = now + self.resume.reconnect_s
                attempts = 0
                self._status("reconnecting")
            attempts += 1
            wait = rs.reconnect_wait_s(attempts, outcome.retry_after_s, self.rng)
            if trio.current_time() + wait >= deadline:
                raise ClientError(
                    "reconnect_failed",
                    f"the connection was lost and the session could not be resumed within "
                    f"{self.resume.reconnect_s:g} s (last: {outcome.why})",
                    self.result,
                )
            await trio.sleep(wait)
            self.result.reconnect_attempts += 1

    async def _converse(self, link: Link, deadline: float) -> _Outcome:
        """One connection: (re)start, audio, reading; how it ended."""
        ws = link.ws
        try:
            offset: int | None = 0
            if self.reconnecting:
                # The resume's latency runs from here: the backoff before it is the client's.
                self.reconnected_at = trio.current_time()
                await ws.send_message(json.dumps(self.state.start_message(self.api_key)))
                answer: dict[str, Any] | None = None
                with trio.move_on_at(deadline):
                    answer = json.loads(await ws.get_message())
                if answer is None:
                    return _Outcome("retry", "no answer to the resume in time")
                offset, refused = self._on_resume_answer(answer)
                if refused is not None:
                    return refused
            else:
                await ws.send_message(json.dumps(self.start))
            async with trio.open_nursery() as nursery:
                if offset is not None:
                    nursery.start_soon(self._send_from, ws, offset)
                if self.fault is not None:
                    nursery.start_soon(self.fault, link)
                outcome = await self._receive(ws)
                nursery.cancel_scope.cancel()
            return outcome
        except ClientError as exc:  # resume_gap, from _on_resume_answer
            return _Outcome("ended", error=exc)
        except ConnectionClosed as exc:
            code = exc.reason.code if exc.reason else None
            return self._lost(code, f"close code {code}")
        except (trio.BrokenResourceError, OSError) as exc:
            return self._lost(None, repr(exc))

    def _on_resume_answer(self, answer: dict[str, Any]) -> tuple[int | None, _Outcome | None]:
        """(where to send audio from, None) after ``resumed``; (None, outcome) if refused."""
        kind = answer.get("type")
        if kind == "error":
            code, message = str(answer.get("code", "")), str(answer.get("message", ""))
            fatal = rs.fatal_error(code, message)
            if fatal is not None:
                return None, _Outcome("ended", error=fatal)
            if code in rs.RETRY_LATER:
                retry = answer.get("retry_after_s")
                return None, _Outcome("retry", code, float(retry) if retry else None)
            self._deliver(answer)  # any other refusal ends the session as it would at start
            return None, _Outcome("ended")
        if kind != "resumed":
            error = ClientError("resume_failed", f"the server answered a resume with {answer!r}")
            return None, _Outcome("ended", error=error)
        self.reconnecting = False
        self.state.on_resumed(answer)
        self.result.resumes += 1
        self._deliver(answer)
        self._status("resumed")
        offset = rs.resend_offset(
            answer, fmt=self.fmt, sample_rate=self.sample_rate, channels=self.channels,
            size=len(self.audio),
        )  # fmt: skip
        if offset is not None and self.paced and self.t0 is not None:
            produced = min(len(self.audio), int((trio.current_time() - self.t0) * self.bytes_per_s))
            buffer_bytes = int(self.resume.buffer_s * self.bytes_per_s)
            rs.check_window(offset, produced, buffer_bytes, self.bytes_per_s)
        return offset, None

    def _lost(self, code: int | None, why: str) -> _Outcome:
        """A connection that ended before ``done`` without an error event."""
        self.result.close_code = code
        if code in rs.SESSION_ENDING_CLOSE_CODES:
            # What ends a session mid-way (session_taken) or answers a resume is an error;
            # other ending codes keep today's meaning (the caller sees the close code).
            error = rs.fatal_close(code, resuming=self.reconnecting)
            return _Outcome("ended", why, error=error)
        return _Outcome("retry" if self.reconnecting else "lost", why)

    async def _send_from(self, ws: WebSocketConnection, offset: int) -> None:
        # The server may close mid-send (an error event explains why) or the connection may
        # drop: the receiver reports either.
        try:
            if self.t0 is None:
                self.t0 = trio.current_time()
            for i in range(offset, len(self.audio), self.frame_bytes):
                frame = self.audio[i : i + self.frame_bytes]
                await ws.send_message(frame)
                if self.paced:
                    # On the microphone's clock: after a resume, what it recorded meanwhile
                    # goes at once, then the pace resumes.
                    await trio.sleep_until(self.t0 + (i + len(frame)) / self.bytes_per_s)
            if self.send_stop:
                await ws.send_message(json.dumps({"type": "stop"}))
        except (ConnectionClosed, trio.BrokenResourceError):
            pass

    async def _receive(self, ws: WebSocketConnection) -> _Outcome:
        while True:
            try:
                raw = await ws.get_message()
            except ConnectionClosed as exc:
                code = exc.reason.code if exc.reason else None
                return self._lost(code, f"close code {code}")
            event = json.loads(raw)
            kind = event.get("type")
            now = trio.current_time()
            if kind in _RESULTS and self.reconnected_at is not None and not self.reconnecting:
                self.result.resume_latencies_s.append(now - self.reconnected_at)
                self.result.resume_first_kinds.append(str(kind))
                self.reconnected_at = None
            if kind in ("final", "error", "done") and self.lost_at is not None:
                self.result.outage_to_final_s.append(now - self.lost_at)
                self.lost_at = None
            if kind in ("final", "error") and not self.state.accept(event, self.result):
                continue
            if kind == "ready":
                self.result.session_id = event.get("session_id", "")
                self.state.on_ready(event)
            elif kind == "final" and self.result.first_final_s is None:
                self.result.first_final_s = time.monotonic() - self.started
            elif kind == "error" and event.get("code") in ("session_taken", "resume_expired"):
                # Another connection has the session now, or it is gone: no resume can help
                # (an error of the session's own, such as unauthorized at start, ends it as
                # before: the caller reads the error event).
                fatal = rs.fatal_error(str(event["code"]), str(event.get("message")))
                return _Outcome("ended", error=fatal)
            self._deliver(event)
            if kind == "done":
                return _Outcome("done")

    def _deliver(self, event: dict[str, Any]) -> None:
        self.result.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
