"""Client protocol v1, sans-IO: no sockets, no NATS."""

from __future__ import annotations

import json

import numpy as np
import pytest

from katydid.errors import ErrorCode, ProtocolError
from katydid.messages import JobResult, ResultSegment
from katydid.protocol import Done, ErrorEvent, Final, Limits, ServerProtocol, State


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


def _started(**start: object) -> ServerProtocol:
    proto = ServerProtocol("s1", Limits(chunk_min_s=2.0, file_chunk_min_s=2.0, chunk_max_s=10.0))
    assert proto.receive_text(json.dumps({"type": "start", **start})) == "start"
    return proto


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("not json", ErrorCode.BAD_MESSAGE),
        ("[1, 2]", ErrorCode.BAD_MESSAGE),
        ('{"type": 5}', ErrorCode.BAD_MESSAGE),
        ('{"type": "dance"}', ErrorCode.BAD_MESSAGE),
        ('{"type": "stop"}', ErrorCode.BAD_MESSAGE),  # before start
        ('{"type": "start", "format": "aiff"}', ErrorCode.UNSUPPORTED_AUDIO),
        ('{"type": "start", "sample_rate": "16000"}', ErrorCode.BAD_MESSAGE),
        ('{"type": "start", "sample_rate": 100}', ErrorCode.UNSUPPORTED_AUDIO),
        ('{"type": "start", "channels": true}', ErrorCode.BAD_MESSAGE),
        ('{"type": "start", "partials": "yes"}', ErrorCode.BAD_MESSAGE),
    ],
)
def test_malformed_control_messages_get_codes(text: str, code: ErrorCode) -> None:
    proto = ServerProtocol("s1")
    with pytest.raises(ProtocolError) as info:
        proto.receive_text(text)
    assert info.value.code is code
    assert info.value.close_code in (1003, 1008)


def test_order_of_messages_is_enforced() -> None:
    proto = ServerProtocol("s1")
    with pytest.raises(ProtocolError, match="only allowed between start and stop"):
        proto.receive_bytes(b"\0\0")
    proto.receive_text('{"type": "start"}')
    with pytest.raises(ProtocolError, match="start sent twice"):
        proto.receive_text('{"type": "start"}')
    proto.receive_text('{"type": "stop"}')
    with pytest.raises(ProtocolError, match="only allowed between start and stop"):
        proto.receive_bytes(b"\0\0")


def test_pcm_stream_is_chunked_and_split_samples_are_joined() -> None:
    proto = _started()
    pcm = _speech_like(9.0)
    chunks = []
    for i in range(0, len(pcm), 3201):  # odd frame size: samples split across frames
        chunks += proto.receive_bytes(pcm[i : i + 3201])
    assert proto.receive_text('{"type": "stop"}') == "stop"
    chunks += proto.flush()
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert len(chunks) >= 3
    total = sum(c.audio.size for c in chunks)
    assert abs(total - 9 * 16_000) <= 16_000  # trailing silence may be dropped
    offsets = [c.offset_s for c in chunks]
    assert offsets == sorted(offsets)
    assert all(c.duration_s <= 10.0 for c in chunks)
    assert proto.state is State.STOPPED


def test_odd_length_pcm_is_an_error_at_stop() -> None:
    proto = _started()
    proto.receive_bytes(b"\x01\x02\x03")
    proto.receive_text('{"type": "stop"}')
    with pytest.raises(ProtocolError, match="odd-length"):
        proto.flush()


def test_bounds() -> None:
    proto = ServerProtocol(
        "s1",
        Limits(
            max_frame_bytes=100,
            max_session_s=1.0,
            chunk_min_s=0.5,
            file_chunk_min_s=0.5,
            max_file_bytes=150,
        ),
    )
    proto.receive_text('{"type": "start"}')
    with pytest.raises(ProtocolError) as info:
        proto.receive_bytes(b"\0" * 101)
    assert info.value.code is ErrorCode.TOO_LARGE
    assert info.value.close_code == 1009
    for _ in range(320):  # 320 x 100 bytes = exactly 1 s of 16 kHz audio: within the bound
        proto.receive_bytes(b"\0" * 100)
    with pytest.raises(ProtocolError, match="exceeds 1 s"):
        proto.receive_bytes(b"\0" * 100)
    files = ServerProtocol("s2", Limits(max_frame_bytes=100, max_file_bytes=150))
    files.receive_text('{"type": "start", "format": "wav"}')
    files.receive_bytes(b"\0" * 100)
    with pytest.raises(ProtocolError, match="file exceeds 150 bytes"):
        files.receive_bytes(b"\0" * 100)


def test_results_are_delivered_in_order_and_duplicates_ignored() -> None:
    proto = _started()
    pcm = _speech_like(9.0)
    chunks = proto.receive_bytes(pcm)
    proto.receive_text('{"type": "stop"}')
    chunks += proto.flush()
    n = len(chunks)
    assert n >= 3
    out = proto.receive_result(_result(2, "two"))
    assert out == []  # waits for 0 and 1
    out = proto.receive_result(_result(0, "zero"))
    assert [e.text for e in out if isinstance(e, Final)] == ["zero"]
    assert proto.receive_result(_result(0, "zero again")) == []  # a redelivered duplicate
    out = proto.receive_result(_result(1, "", error={"code": "expired", "message": "late"}))
    assert isinstance(out[0], ErrorEvent)
    assert out[0].code is ErrorCode.TIMEOUT
    assert out[0].seq == 1
    assert [e.text for e in out[1:] if isinstance(e, Final)] == ["two"]
    for seq in range(3, n):
        proto.receive_result(_result(seq, f"t{seq}"))
    assert proto.done
    done = proto.done_event()
    assert isinstance(done, Done)
    assert (done.chunks, done.failed_chunks) == (n, 1)
    assert json.loads(done.to_json())["type"] == "done"


def test_not_done_until_flushed_even_with_zero_chunks() -> None:
    proto = _started()
    proto.receive_text('{"type": "stop"}')
    assert not proto.done  # container decode or flush still pending
    assert proto.flush() == []
    assert proto.done


def test_long_files_go_to_the_bulk_lane() -> None:
    proto = ServerProtocol(
        "s1", Limits(bulk_min_audio_s=5.0, file_chunk_min_s=2.0, chunk_max_s=10.0)
    )
    proto.receive_text('{"type": "start", "format": "wav"}')
    proto.receive_bytes(b"RIFF....")
    proto.receive_text('{"type": "stop"}')
    assert proto.take_file().read() == b"RIFF...."
    audio = np.frombuffer(_speech_like(6.0), dtype="<i2").astype(np.float32) / 32768
    proto.begin_decoded(6.0)
    chunks = proto.receive_decoded(audio[:50_000]) + proto.receive_decoded(audio[50_000:])
    chunks += proto.flush()
    assert proto.lane == "bulk"
    assert chunks
    assert proto.chunks_total == len(chunks)


def test_partials_one_in_flight_per_interval_and_only_when_allowed() -> None:
    proto = ServerProtocol(
        "s1", Limits(chunk_min_s=5.0, file_chunk_min_s=5.0, partial_interval_s=1.0)
    )
    proto.receive_text('{"type": "start", "partials": true}')
    second = _speech_like(1.0, pause_every_s=10.0)  # one voiced second, no pause
    proto.receive_bytes(second[:16_000])  # 0.5 s: too little audio for a partial
    assert proto.take_partial(allowed=True) is None
    proto.receive_bytes(second[16_000:])
    assert proto.take_partial(allowed=False) is None  # queue backed up: skipped, no state change
    taken = proto.take_partial(allowed=True)
    assert taken is not None
    seq, audio = taken
    assert seq == 0
    assert audio.size == 16_000
    proto.receive_bytes(second)
    assert proto.take_partial(allowed=True) is None  # one already in flight
    out = proto.receive_result(
        JobResult("p", "s1", 0, "partial", "so far", (), "en", 1, 0.1, 0, "w", None)
    )
    assert [(e.kind, e.text) for e in out if isinstance(e, Final)] == [("partial", "so far")]
    assert proto.take_partial(allowed=True) is not None  # 2 s buffered, 1 s new since the last


def test_no_partials_unless_asked() -> None:
    proto = _started()
    proto.receive_bytes(_speech_like(3.0, pause_every_s=10.0))
    assert proto.take_partial(allowed=True) is None


def test_limits_from_config_carry_the_same_defaults() -> None:
    from katydid.config import Config

    assert Limits.from_config(Config()) == Limits()
    assert Limits.from_config(Config(max_frame_bytes=4096)).max_frame_bytes == 4096
