"""The session core, sans-IO: frames, results and the clock in; what the adapter must do out.
No sockets, no NATS, no sleeps: time is an input."""

from __future__ import annotations

import errno
import io
import json
from typing import Any

import numpy as np
import pytest

from katydid.errors import ErrorCode
from katydid.gateway.events import Done, ErrorEvent, Final, Queued, Ready
from katydid.gateway.native_wire import receive_text
from katydid.gateway.options import Limits
from katydid.gateway.outputs import (
    Admit,
    CancelJobs,
    Close,
    Decode,
    JobStamp,
    Output,
    Publish,
    Send,
)
from katydid.gateway.session import Session
from katydid.gateway.session_queries import Phase
from katydid.messages import JobResult, ResultSegment

STAMP = JobStamp("katydid.results.test", lambda job_id: f"token-{job_id}", lambda: 1_000.0)


def _speech_like(seconds: float, pause_every_s: float = 1.5, pause_s: float = 0.5) -> bytes:
    """A tone with regular pauses: the chunker's energy VAD sees 'words' and 'pauses'."""
    rate = 16_000
    t = np.arange(int(seconds * rate)) / rate
    voiced = (t % (pause_every_s + pause_s)) < pause_every_s
    audio = 0.3 * np.sin(2 * np.pi * 220 * t) * voiced
    return (audio * 32767).astype("<i2").tobytes()


def _result(
    seq: int, text: str, *, session: str = "s1", error: dict[str, str] | None = None
) -> JobResult:
    segs = (ResultSegment(float(seq), float(seq) + 1.0, text),) if text else ()
    return JobResult(
        f"{session}-{seq}", session, seq, "final", text, segs, "en", 1.0, 0.1, 0.0, "w0", error
    )


def _limits(**overrides: Any) -> Limits:
    base: dict[str, Any] = {
        "chunk_min_s": 2.0,
        "file_chunk_min_s": 2.0,
        "file_chunk_max_s": 10.0,
        "chunk_max_s": 10.0,
    }
    return Limits.default(**(base | overrides))


def _session(**limits: Any) -> Session:
    return Session("s1", _limits(**limits), STAMP, now=0.0)


def _started(session: Session | None = None, **start: object) -> Session:
    s = session or _session()
    out = receive_text(s, json.dumps({"type": "start", **start}), 0.0)
    assert [type(o) for o in out] == [Admit]
    out = s.admitted("tiny.en-q8_0", ({"name": "tiny.en-q8_0"},))
    assert out == [Send(Ready(s.session_id, "tiny.en-q8_0", ({"name": "tiny.en-q8_0"},)))]
    return s


def _sent(outputs: list[Output]) -> list[Any]:
    return [o.event for o in outputs if isinstance(o, Send)]


def _published(
    outputs: list[Output], stream_seq_from: int | None = None, s: Session | None = None
) -> list[Publish]:
    jobs = [o for o in outputs if isinstance(o, Publish)]
    if stream_seq_from is not None and s is not None:
        for i, p in enumerate(jobs):
            assert s.published(p.job.seq, stream_seq_from + i) == []
    return jobs


def _error_and_close(outputs: list[Output]) -> tuple[ErrorEvent, Close]:
    errors = [e for e in _sent(outputs) if isinstance(e, ErrorEvent)]
    closes = [o for o in outputs if isinstance(o, Close)]
    assert (len(errors), len(closes)) == (1, 1), outputs
    assert outputs[-1] is closes[0]  # the close is the last thing a session says
    return errors[0], closes[0]


@pytest.mark.parametrize(
    ("text", "code", "close"),
    [
        ("not json", ErrorCode.BAD_MESSAGE, 1008),
        ("[1, 2]", ErrorCode.BAD_MESSAGE, 1008),
        ('{"type": 5}', ErrorCode.BAD_MESSAGE, 1008),
        ('{"type": "dance"}', ErrorCode.BAD_MESSAGE, 1008),
        ('{"type": "stop"}', ErrorCode.BAD_MESSAGE, 1008),  # before start
        ('{"type": "start", "format": "aiff"}', ErrorCode.UNSUPPORTED_AUDIO, 1003),
        ('{"type": "start", "sample_rate": "16000"}', ErrorCode.BAD_MESSAGE, 1008),
        ('{"type": "start", "sample_rate": 100}', ErrorCode.UNSUPPORTED_AUDIO, 1003),
        ('{"type": "start", "channels": true}', ErrorCode.BAD_MESSAGE, 1008),
        ('{"type": "start", "partials": "yes"}', ErrorCode.BAD_MESSAGE, 1008),
        ('{"type": "start", "task": "summarise"}', ErrorCode.BAD_MESSAGE, 1008),
        ('{"type": "start", "prompt": "' + "é" * 600 + '"}', ErrorCode.TOO_LARGE, 1009),
        # Nested past the parser's recursion limit: a RecursionError, not a ValueError.
        ('{"type": "start", "x": ' + "[" * 5000 + "]" * 5000 + "}", ErrorCode.BAD_MESSAGE, 1008),
        ('{"type": "start", "max_wait_s": Infinity}', ErrorCode.BAD_MESSAGE, 1008),
        ('{"type": "start", "max_wait_s": NaN}', ErrorCode.BAD_MESSAGE, 1008),
        # Valid JSON, no float (OverflowError: was `internal`/1011 with a traceback logged).
        ('{"type": "start", "max_wait_s": 1' + "0" * 400 + "}", ErrorCode.BAD_MESSAGE, 1008),
        ('{"type": "start", "sample_rate": 1' + "0" * 400 + "}", ErrorCode.UNSUPPORTED_AUDIO, 1003),
    ],
)
def test_malformed_control_messages_get_codes(text: str, code: ErrorCode, close: int) -> None:
    s = _session()
    error, closed = _error_and_close(receive_text(s, text, 0.0))
    assert error.code is code
    assert len(error.message) < 200  # a client's 400 digits are not echoed back
    assert closed.code == close
    assert (s.closed, s.outcome) == (True, str(code))
    assert receive_text(s, '{"type": "start"}', 1.0) == []  # a closed session says nothing more


def test_order_of_messages_is_enforced() -> None:
    early = _session()
    error, _ = _error_and_close(early.receive_bytes(b"\0\0", 0.0))
    assert "only allowed between start and stop" in error.message
    twice = _started()
    error, _ = _error_and_close(receive_text(twice, '{"type": "start"}', 0.0))
    assert error.message == "start sent twice"
    after, _ = _three_jobs()  # stopped, waiting for results
    error, _ = _error_and_close(after.receive_bytes(b"\0\0", 0.0))
    assert "only allowed between start and stop" in error.message


def test_pcm_stream_is_chunked_into_jobs_and_split_samples_are_joined() -> None:
    s = _started(language="EN-us", word_timestamps=True, prompt="Katydid")
    pcm = _speech_like(9.0)
    jobs: list[Publish] = []
    for i in range(0, len(pcm), 3201):  # odd frame size: samples split across frames
        jobs += _published(s.receive_bytes(pcm[i : i + 3201], 0.0))
    jobs += _published(receive_text(s, '{"type": "stop"}', 0.0))
    assert [p.job.seq for p in jobs] == list(range(len(jobs)))
    assert len(jobs) >= 3
    total = sum(len(p.pcm) // 2 for p in jobs)
    assert abs(total - 9 * 16_000) <= 16_000  # trailing silence may be dropped
    offsets = [p.job.offset_ms for p in jobs]
    assert offsets == sorted(offsets)
    assert all(len(p.pcm) <= 10 * 32_000 for p in jobs)
    first = jobs[0]
    assert (first.model, first.lane) == ("tiny.en-q8_0", "interactive")
    assert first.job.job_id == "s1-0"
    assert first.job.token == "token-s1-0"
    assert first.job.reply_subject == "katydid.results.test.s1"  # per session: resumable
    assert first.job.deadline_unix_ms == (1_000 + s.limits.job_deadline_s) * 1000
    opts = first.job.options
    assert (opts.language, opts.word_timestamps, opts.prompt, opts.kind) == (
        "en", True, "Katydid", "final",
    )  # fmt: skip
    assert s.phase is Phase.STOPPED


def test_pcm_reaches_the_job_bit_exact() -> None:
    s = _started()
    pattern = np.array([1000, -1000, 32767, -32768, 0, 1, -1, 12345] * 4000, dtype="<i2")
    jobs = _published(s.receive_bytes(pattern.tobytes(), 0.0))
    jobs += _published(receive_text(s, '{"type": "stop"}', 0.0))
    assert b"".join(p.pcm for p in jobs) == pattern.tobytes()


def test_odd_length_pcm_is_an_error_at_stop() -> None:
    s = _started()
    assert s.receive_bytes(b"\x01\x02\x03", 0.0) == []
    error, close = _error_and_close(receive_text(s, '{"type": "stop"}', 0.0))
    assert "odd-length" in error.message
    assert close.code == 1008


def test_bounds() -> None:
    s = _started(_session(max_frame_bytes=100, max_session_s=1.0, chunk_min_s=0.5))
    for _ in range(320):  # 320 x 100 bytes = exactly 1 s of 16 kHz audio: within the bound
        out = s.receive_bytes(b"\0" * 100, 0.0)
        assert not any(isinstance(o, Close) for o in out)
    error, close = _error_and_close(s.receive_bytes(b"\0" * 100, 0.0))
    assert "exceeds 1 s" in error.message
    assert close.code == 1009
    big = _started(_session(max_frame_bytes=100))
    error, close = _error_and_close(big.receive_bytes(b"\0" * 101, 0.0))
    assert (error.code, close.code) == (ErrorCode.TOO_LARGE, 1009)
    files = _started(_session(max_frame_bytes=100, max_file_bytes=150), format="wav")
    assert files.receive_bytes(b"\0" * 100, 0.0) == []
    error, _ = _error_and_close(files.receive_bytes(b"\0" * 100, 0.0))
    assert error.message == "file exceeds 150 bytes"
    # A piece of a message (a door that hands an upload on as it arrives): the message's size.
    pieces = _started(_session(max_frame_bytes=100), format="wav")
    assert pieces.receive_bytes(b"\0" * 60, 0.0, message_bytes=60) == []
    error, close = _error_and_close(pieces.receive_bytes(b"\0" * 60, 0.0, message_bytes=120))
    assert (error.code, close.code) == (ErrorCode.TOO_LARGE, 1009)
    # A control message is bounded in bytes: 40 characters of 3 bytes are over 100.
    wide = _session(max_frame_bytes=100)
    error, close = _error_and_close(
        receive_text(wide, '{"type": "start", "x": "' + "€" * 40 + '"}', 0.0)
    )
    assert (error.code, close.code) == (ErrorCode.TOO_LARGE, 1009)


def _three_jobs(**limits: Any) -> tuple[Session, list[Publish]]:
    s = _started(_session(**limits))
    jobs = _published(s.receive_bytes(_speech_like(9.0), 0.0))
    jobs += _published(receive_text(s, '{"type": "stop"}', 0.0))
    assert len(jobs) >= 3
    for i, p in enumerate(jobs):
        assert s.published(p.job.seq, 100 + i) == []
    return s, jobs


def test_results_are_delivered_in_order_duplicates_ignored_then_done_and_close() -> None:
    s, jobs = _three_jobs()
    n = len(jobs)
    assert s.receive_result(_result(2, "two")) == []  # waits for 0 and 1
    assert [e.text for e in _sent(s.receive_result(_result(0, "zero")))] == ["zero"]
    assert s.receive_result(_result(0, "zero again")) == []  # a redelivered duplicate
    out = _sent(s.receive_result(_result(1, "", error={"code": "expired", "message": "late"})))
    assert isinstance(out[0], ErrorEvent)
    assert (out[0].code, out[0].seq) == (ErrorCode.TIMEOUT, 1)
    assert [e.text for e in out[1:] if isinstance(e, Final)] == ["two"]
    for seq in range(3, n - 1):
        s.receive_result(_result(seq, f"t{seq}"))
    assert not s.closed
    last = s.receive_result(_result(n - 1, "last"))
    assert last[-2] == Send(Done(n, s.audio_s, 1))
    assert last[-1] == Close(1000, "done", "ok")
    assert (s.closed, s.outcome) == (True, "ok")
    assert not any(isinstance(o, CancelJobs) for o in last)  # nothing left to cancel


def test_a_result_for_an_unknown_job_or_another_session_changes_nothing() -> None:
    s, _ = _three_jobs()
    assert s.receive_result(_result(99, "from nowhere")) == []
    assert s.receive_result(_result(0, "answered before")) != []
    assert s.chunks_answered == 1


def test_a_result_before_its_publish_is_acknowledged_is_not_lost() -> None:
    s = _started()
    jobs = _published(s.receive_bytes(_speech_like(9.0), 0.0))
    assert jobs
    seq = jobs[0].job.seq
    assert _sent(s.receive_result(_result(seq, "quick")))[0].text == "quick"
    assert s.published(seq, 7) == []  # the late acknowledgement holds nothing
    assert s.oldest_stream_seq is None or s.oldest_stream_seq != 7


def test_a_dead_job_fails_its_chunk_only() -> None:
    s, _ = _three_jobs()
    out = _sent(s.dead_job(100, 4))
    assert isinstance(out[0], ErrorEvent)
    assert (out[0].code, out[0].seq) == (ErrorCode.INTERNAL, 0)
    assert "4 deliveries" in out[0].message
    assert s.dead_job(12345, 4) == []  # not the session's
    assert not s.closed


def test_client_leaving_mid_stream_cancels_its_unanswered_jobs() -> None:
    s, jobs = _three_jobs()
    s.receive_result(_result(0, "zero"))
    out = s.client_gone()
    assert out == [CancelJobs("s1", tuple(range(101, 100 + len(jobs))))]
    assert (s.closed, s.outcome) == (True, "client_gone")
    # A job whose publish was still unacknowledged is cancelled when it is.
    late = _started(Session("s2", _limits(), STAMP, now=0.0))
    pending = _published(late.receive_bytes(_speech_like(9.0), 0.0))
    assert late.client_gone() == []
    assert late.published(pending[0].job.seq, 555) == [CancelJobs("s2", (555,))]


def test_client_leaving_after_done_cancels_nothing() -> None:
    s, jobs = _three_jobs()
    for seq in range(len(jobs)):
        s.receive_result(_result(seq, "x"))
    assert s.closed
    assert s.client_gone() == []
    assert s.outcome == "ok"


def test_start_and_idle_timeouts_by_the_clock() -> None:
    s = _session(start_timeout_s=30.0, idle_timeout_s=120.0)
    assert s.deadline == 30.0
    assert s.tick(29.9) == []
    error, close = _error_and_close(s.tick(30.0))
    assert (error.code, close.code) == (ErrorCode.TIMEOUT, 4008)
    assert "no start message within 30 s" in error.message
    idle = _started(_session(idle_timeout_s=120.0))
    idle.receive_bytes(b"\0" * 3200, 50.0)
    assert idle.deadline == 170.0
    assert idle.tick(169.0) == []
    error, close = _error_and_close(idle.tick(170.0))
    assert "no message for 120 s" in error.message


def test_result_timeout_after_stop_cancels_what_is_unanswered() -> None:
    s = _started(_session(result_timeout_s=900.0))
    jobs = _published(s.receive_bytes(_speech_like(9.0), 10.0))
    for i, p in enumerate(jobs):
        s.published(p.job.seq, 10 + i)
    _published(receive_text(s, '{"type": "stop"}', 20.0), 20, s)
    assert s.deadline == 920.0
    out = s.tick(920.0)
    error, close = _error_and_close(out)
    assert close.code == 4008
    assert "no result for 900 s" in error.message
    cancels = [o for o in out if isinstance(o, CancelJobs)]
    assert cancels
    assert set(cancels[0].stream_seqs) >= {10 + i for i in range(len(jobs))}


def test_result_timeout_counts_from_the_last_result() -> None:
    # A long upload whose chunks keep coming back is not timed out for taking long in all.
    s = _started(_session(result_timeout_s=900.0))
    jobs = _published(s.receive_bytes(_speech_like(9.0), 10.0))
    assert len(jobs) >= 2
    for i, p in enumerate(jobs):
        s.published(p.job.seq, 10 + i)
    _published(receive_text(s, '{"type": "stop"}', 20.0), 20, s)
    s.progressed(10.0)  # before stop: no later than stop
    assert s.deadline == 920.0
    s.receive_result(_result(0, "x"))
    s.progressed(800.0)
    assert (s.deadline, s.tick(1000.0)) == (1700.0, [])
    error, close = _error_and_close(s.tick(1700.0))
    assert (error.code, close.code) == (ErrorCode.TIMEOUT, 4008)


def test_backpressure_at_the_in_flight_bound_is_not_an_idle_timeout() -> None:
    s = _started(_session(max_jobs_in_flight=2, idle_timeout_s=5.0))
    jobs = _published(s.receive_bytes(_speech_like(9.0), 0.0), 1, s)
    assert len(jobs) >= 2
    assert not s.wants_audio
    assert s.deadline == float("inf")  # waiting on us, not on the client
    for seq in range(len(jobs) - 1):
        s.receive_result(_result(seq, "x"))
    assert (s.in_flight, s.wants_audio) == (1, True)
    s.resumed(100.0)
    assert s.deadline == 105.0


def test_shutdown_with_jobs_in_flight() -> None:
    s, jobs = _three_jobs()
    out = s.shutdown()
    error, close = _error_and_close(out)
    assert (error.code, error.retry_after_s, close.code) == (ErrorCode.OVERLOADED, 5.0, 1013)
    assert [o for o in out if isinstance(o, CancelJobs)] == [
        CancelJobs("s1", tuple(range(100, 100 + len(jobs))))
    ]
    assert s.outcome == "shutdown"


def test_a_lost_queue_ends_only_sessions_waiting_for_results() -> None:
    s, _ = _three_jobs()
    error, close = _error_and_close(s.queue_lost())
    assert (error.code, error.retry_after_s, close.code) == (ErrorCode.OVERLOADED, 5.0, 1013)
    idle = _started()
    assert idle.queue_lost() == []


def test_publish_failures() -> None:
    from katydid.errors import ProtocolError

    s = _started()
    job = _published(s.receive_bytes(_speech_like(9.0), 0.0))[0]
    full = ProtocolError(ErrorCode.OVERLOADED, "the job queue is full", retry_after_s=3.0)
    error, close = _error_and_close(s.publish_failed(job.job, full))
    assert (error.retry_after_s, close.code) == (3.0, 1013)


def test_not_done_until_flushed_even_with_zero_chunks() -> None:
    s = _started()
    out = receive_text(s, '{"type": "stop"}', 0.0)
    assert out[-1] == Close(1000, "done", "ok")
    assert _sent(out) == [Done(0, 0.0, 0)]


def test_an_upload_is_decoded_after_stop_and_long_files_go_to_the_bulk_lane() -> None:
    s = _started(_session(bulk_min_audio_s=5.0), format="wav")
    s.receive_bytes(b"RIFF....", 0.0)
    out = receive_text(s, '{"type": "stop"}', 0.0)
    assert [type(o) for o in out] == [Decode]
    decode = out[0]
    assert isinstance(decode, Decode)
    assert decode.upload.read() == b"RIFF...."
    audio = np.frombuffer(_speech_like(6.0), dtype="<i2")
    s.decoding(6.0)
    jobs = _published(s.decoded(audio[:50_000]) + s.decoded(audio[50_000:]))
    end = s.decoded_end()
    jobs += _published(end)
    assert {p.lane for p in jobs} == {"bulk"}
    assert s.chunks_total == len(jobs)
    assert not s.closed  # until every chunk is answered
    empty = _started(Session("s3", _limits(), STAMP, now=0.0), format="wav")
    error, close = _error_and_close(receive_text(empty, '{"type": "stop"}', 0.0))
    assert (error.code, close.code) == (ErrorCode.UNSUPPORTED_AUDIO, 1003)


def test_partials_one_in_flight_per_interval_and_only_when_allowed() -> None:
    s = _started(
        _session(chunk_min_s=5.0, file_chunk_min_s=5.0, partial_interval_s=1.0), partials=True
    )
    second = _speech_like(1.0, pause_every_s=10.0)  # one voiced second, no pause
    assert s.receive_bytes(second[:16_000], 0.0, partials_allowed=True) == []  # 0.5 s: too little
    assert s.receive_bytes(second[16_000:], 0.0, partials_allowed=False) == []  # backed up
    taken = _published(s.receive_bytes(b"", 0.0, partials_allowed=True))
    assert len(taken) == 1
    partial = taken[0]
    assert (partial.job.seq, partial.job.options.kind, len(partial.pcm)) == (0, "partial", 32_000)
    assert partial.job.options.word_timestamps is False
    assert partial.job.deadline_unix_ms == (1_000 + s.limits.partial_deadline_s) * 1000
    assert _published(s.receive_bytes(second, 0.0, partials_allowed=True)) == []  # one in flight
    out = s.receive_result(
        JobResult("p", "s1", 0, "partial", "so far", (), "en", 1, 0.1, 0, "w", None)
    )
    assert [(e.kind, e.text) for e in _sent(out)] == [("partial", "so far")]
    assert len(_published(s.receive_bytes(b"", 0.0, partials_allowed=True))) == 1


def test_partials_come_every_interval_of_audio_to_the_frame() -> None:
    # 100 ms frames and a 0.9 s interval: every ninth frame, never the tenth (the interval was
    # compared in float seconds, and half of all partials slipped a frame).
    s = _started(
        _session(chunk_min_s=5.0, file_chunk_min_s=5.0, partial_interval_s=0.9), partials=True
    )
    audio = _speech_like(6.0, pause_every_s=10.0)
    frame = 3_200  # bytes: 100 ms
    taken_at = []
    for k in range(len(audio) // frame):
        piece = audio[k * frame : (k + 1) * frame]
        out = _published(s.receive_bytes(piece, 0.0, partials_allowed=True))
        for p in out:
            taken_at.append(k + 1)
            s.receive_result(
                JobResult(p.job.job_id, "s1", 0, "partial", "x", (), "en", 1, 0.1, 0, "w", None)
            )
    assert taken_at == [10, 19, 28, 37, 46, 55]


def test_no_partials_unless_asked() -> None:
    s = _started()
    assert (
        _published(
            s.receive_bytes(_speech_like(3.0, pause_every_s=10.0), 0.0, partials_allowed=True)
        )
        == []
    )


def test_queue_status_is_sent_when_it_is_news() -> None:
    s, _ = _three_jobs()  # queued_interval_s: 2 s by default
    assert _sent(s.queue_status(100, 50.0, 10.0)) == [Queued(100, 50.0)]
    assert s.queue_status(91, 49.0, 13.0) == []  # moved by less than 10%
    assert s.queue_status(90, 45.0, 11.0) == []  # moved by 10%, but 1 s after the last
    assert _sent(s.queue_status(90, 45.0, 12.0)) == [Queued(90, 45.0)]
    assert s.queue_status(90, 45.2, 20.0) == []  # same place, same ETA
    assert _sent(s.queue_status(0, 2.0, 20.5)) == [Queued(0, 2.0)]  # the front: at once
    assert s.queue_status(0, 1.0, 21.0) == []  # at the front already: the interval holds
    assert _sent(s.queue_status(0, 0.4, 22.5)) == [Queued(0, 0.4)]


def test_every_change_is_news_with_no_interval() -> None:
    s, _ = _three_jobs(queued_interval_s=0.0)
    assert _sent(s.queue_status(5, 5.0, 1.0)) == [Queued(5, 5.0)]
    assert _sent(s.queue_status(4, 4.0, 1.0)) == [Queued(4, 4.0)]


def test_limits_come_from_the_configuration() -> None:
    from katydid.config import Config

    assert Limits.from_config(Config()) == Limits.default()
    assert Limits.default(max_frame_bytes=4096).max_frame_bytes == 4096


class _FullDisk(io.BytesIO):
    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_an_upload_with_no_room_on_disk_is_told_overloaded_with_a_retry() -> None:
    s = _session()
    receive_text(s, json.dumps({"type": "start", "format": "wav"}), 0.0)
    s.admitted("tiny.en-q8_0", ({"name": "tiny.en-q8_0"},), _FullDisk())
    error, close = _error_and_close(s.receive_bytes(b"RIFF....", 0.0))
    assert (error.code, close.code) == (ErrorCode.OVERLOADED, 1013)
    assert "No space left on device" in error.message
    assert error.retry_after_s is not None


def test_an_unknown_message_type_is_named_but_not_echoed_whole() -> None:
    from katydid.config import Config
    from katydid.errors import ProtocolError
    from katydid.gateway.native_wire import parse_text

    limits = Limits.from_config(Config())
    with pytest.raises(ProtocolError, match="unknown message type 'pause'"):
        parse_text('{"type": "pause"}', limits)
    with pytest.raises(ProtocolError) as refused:
        parse_text(json.dumps({"type": "x" * 100_000}), limits)
    assert len(str(refused.value)) < 200
    assert "100000 characters" in str(refused.value)


@pytest.mark.parametrize(
    ("resume", "why"),
    [
        ("yes", "must be an object"),
        ({"session_id": "x" * 32, "token": "t"}, "not a session id"),
        ({"session_id": "0" * 32, "token": 7}, "token must be a string"),
        ({"session_id": "0" * 32, "token": "t" * 129}, "token must be a string"),
        ({"session_id": "0" * 32, "token": "t", "after_seq": True}, "after_seq"),
        ({"session_id": "0" * 32, "token": "t", "after_seq": -2}, "after_seq"),
        ({"session_id": "0" * 32, "token": "t", "after_seq": "3"}, "after_seq"),
    ],
)
def test_a_malformed_resume_is_bad_message(resume: Any, why: str) -> None:
    from katydid.config import Config
    from katydid.errors import ProtocolError
    from katydid.gateway.inputs import Resume
    from katydid.gateway.native_wire import parse_text

    limits = Limits.from_config(Config())
    with pytest.raises(ProtocolError) as caught:
        parse_text(json.dumps({"type": "start", "resume": resume}), limits)
    assert caught.value.code is ErrorCode.BAD_MESSAGE
    assert why in caught.value.message
    good = {"session_id": "0" * 32, "token": "t", "after_seq": 4}
    assert parse_text(json.dumps({"type": "start", "resume": good}), limits) == Resume(
        "0" * 32, "t", 4
    )


def test_a_resumed_sessions_partials_have_job_ids_no_earlier_connection_used() -> None:
    # Same ids would be dropped by JetStream as duplicates (Nats-Msg-Id): the partial never
    # comes, and the one in flight holds back every later partial of the session.
    from katydid.gateway.inputs import Resume

    def partial_ids(s: Session, n: int) -> list[str]:
        ids = []
        for _ in range(n):
            (taken,) = _published(s.receive_bytes(second, 0.0, partials_allowed=True))
            ids.append(taken.job.job_id)
            s.receive_result(
                JobResult(taken.job.job_id, s.session_id, 0, "partial", "so far", (), "en", 1,
                          0.1, 0, "w", None)
            )  # fmt: skip
        return ids

    limits = {"chunk_min_s": 5.0, "file_chunk_min_s": 5.0, "partial_interval_s": 1.0}
    second = _speech_like(1.0, pause_every_s=10.0)
    first = _started(_session(**limits), partials=True)
    first.resumable = True
    earlier = partial_ids(first, 3)
    record = first.record("attached", "g1", "o1", "", 0.0)
    seen = set(earlier)
    for n, conn_id in enumerate(("s2", "s3"), start=1):
        again = Session(conn_id, _limits(**limits), STAMP, now=0.0, resumable=True)
        assert [type(o).__name__ for o in again.receive(Resume("s1", "t", -1), 0.0)] == ["Reattach"]
        again.reattached(record, -1, "t", 0.0)
        assert again.session_id == "s1"
        for _ in range(2):  # the client resends the 3 s it had sent: no partial before it is in
            assert _published(again.receive_bytes(second, 0.0, partials_allowed=True)) == []
        ids = partial_ids(again, 3)
        assert not seen & set(ids), f"resume {n} reused {sorted(seen & set(ids))}"
        seen |= set(ids)
