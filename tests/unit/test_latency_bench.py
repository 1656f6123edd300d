"""The latency benchmark's scoring, on crafted event timelines (the run itself: nox -s latency)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.bench.latency import (
    ClipLatency,
    markdown_streams,
    realtime_events,
    realtime_pieces,
    report,
    score_clip,
    stream_orders,
    utterances,
)


def test_short_utterances_join_the_next_and_short_gaps_merge() -> None:
    spans = [(0.0, 0.5), (1.1, 2.0), (2.2, 3.0), (4.0, 6.0)]
    assert [(u.start_s, u.end_s) for u in utterances(spans)] == [(0.0, 3.0), (4.0, 6.0)]
    assert len(utterances(spans, min_utterance_s=0.0)) == 3  # 0.6 s pause after a short one


def test_finals_are_timed_from_the_end_of_speech_they_carry() -> None:
    spans = [(0.5, 3.0), (4.0, 7.0)]
    events: list[tuple[float, dict[str, Any]]] = [
        (2.0, {"type": "partial", "text": "hello"}),
        (3.0, {"type": "partial", "text": "hello there"}),
        (3.8, {"type": "final", "text": "hello there", "end_s": 2.9}),
        (5.6, {"type": "partial", "text": "general"}),
        (6.5, {"type": "partial", "text": "general kenobi"}),
        (7.9, {"type": "final", "text": "general kenobi", "end_s": 7.1}),
        (8.0, {"type": "done"}),
    ]
    scored = score_clip("c", "hello there general kenobi", spans, events)
    assert scored.latencies_s == pytest.approx([0.8, 0.9])
    assert scored.unmatched_finals == 0
    assert scored.stream_errors == (0, 4)
    # Speech 0.5-3.0: results at 2.0 and 3.0 after 2.0 (= 0.5 + 1.5); 4.0-7.0: 5.6, 6.5.
    assert scored.partial_gaps_s == pytest.approx([0.0, 1.0, 0.0, 0.1, 0.9, 0.5])
    summary = report([scored])
    assert summary["end_of_speech_to_final_s"]["p50"] == pytest.approx(0.85)
    assert summary["wer_streaming"] == 0.0


def test_a_final_is_never_timed_from_speech_not_yet_spoken() -> None:
    events = [(1.0, {"type": "final", "text": "one", "end_s": 1.2})]
    scored = score_clip("c", "one", [(0.2, 0.8), (1.6, 2.0)], events)
    assert scored.latencies_s == pytest.approx([0.2])  # 0.8, not 2.0 (spoken after it arrived)


def test_concurrent_streams_each_play_every_clip_starting_apart() -> None:
    orders = stream_orders(16, 10)
    assert len(orders) == 10
    assert all(sorted(o) == list(range(16)) for o in orders)  # every clip once per stream
    assert len({o[0] for o in orders}) == 10  # at first, ten different clips at once
    assert stream_orders(3, 3) == [[0, 1, 2], [1, 2, 0], [2, 0, 1]]
    assert stream_orders(2, 4) == [[0, 1], [0, 1], [1, 0], [1, 0]]  # more streams than clips
    assert stream_orders(0, 2) == []


def test_concurrent_results_are_pooled_over_every_utterance_and_shown_per_clip() -> None:
    a1 = ClipLatency("a", latencies_s=[0.5, 1.0], stream_errors=(1, 4), file_errors=(0, 4))
    a2 = ClipLatency("a", latencies_s=[2.0], stream_errors=(0, 4), file_errors=(0, 4))
    b = ClipLatency("b", latencies_s=[0.7], stream_errors=(0, 2), file_errors=(1, 2))
    summary = report([a1, a2, b])
    assert summary["finals_matched"] == 4
    assert summary["end_of_speech_to_final_s"]["p50"] == pytest.approx(0.85)
    assert summary["wer_streaming"] == pytest.approx(10.0)  # 1 of 10 words
    assert summary["wer_file"] == pytest.approx(10.0)
    table = markdown_streams([a1, a2, b], summary)
    assert "| a | 2 | 3 | 1.00 / 2.00 | 12.5% | 0.0% |" in table
    assert "| b | 1 | 1 | 0.70 / 0.70 | 0.0% | 50.0% |" in table


_DELTA = "conversation.item.input_audio_transcription.delta"
_COMPLETED = "conversation.item.input_audio_transcription.completed"


def _completed(item: str, transcript: str, seconds: float) -> dict[str, Any]:
    usage = {"type": "duration", "seconds": seconds}
    return {"type": _COMPLETED, "item_id": item, "transcript": transcript, "usage": usage}


def test_realtime_events_read_as_native_partials_and_finals_timed_like_them() -> None:
    spans = [(0.5, 3.0), (4.0, 7.0)]
    events: list[tuple[float, dict[str, Any]]] = [
        (0.1, {"type": "input_audio_buffer.committed", "item_id": "i1"}),
        (2.0, {"type": _DELTA, "item_id": "i1", "delta": "hello"}),
        (3.0, {"type": _DELTA, "item_id": "i1", "delta": " there"}),
        (3.8, {"type": _DELTA, "item_id": "i1", "delta": " you"}),  # the final's own text
        (3.8, _completed("i1", "hello there you", 2.4)),  # 0.5 + 2.4 = 2.9: the pause at 3.0
        (4.1, {"type": "input_audio_buffer.committed", "item_id": "i2"}),
        (5.6, {"type": _DELTA, "item_id": "i2", "delta": "general"}),
        (6.5, {"type": _DELTA, "item_id": "i2", "delta": " kenobi"}),
        (7.9, _completed("i2", "general kenobi", 3.3)),  # from 4.0 (speech after 3.0): 7.3
        (9.0, {"type": "input_audio_buffer.committed", "item_id": "i3"}),
        (9.1, {"type": "input_audio_buffer.cleared"}),
        (9.2, _completed("i3", "", 0.0)),  # the committed silence: no final
    ]
    native = realtime_events(events, spans)
    assert [(t, e["type"]) for t, e in native] == [
        (2.0, "partial"), (3.0, "partial"), (3.8, "final"),
        (5.6, "partial"), (6.5, "partial"), (7.9, "final"),
    ]  # fmt: skip
    assert [e["end_s"] for _, e in native if e["type"] == "final"] == pytest.approx([2.9, 7.3])
    scored = score_clip("c", "hello there you general kenobi", spans, native)
    assert scored.latencies_s == pytest.approx([0.8, 0.9])
    assert scored.stream_errors == (0, 5)
    assert scored.partial_gaps_s == pytest.approx([0.0, 1.0, 0.0, 0.1, 0.9, 0.5])


def test_a_realtime_final_is_anchored_on_the_pause_the_one_before_matched() -> None:
    # The first item's segments overrun its speech (2.0 s for 1.5 s spoken): its end is matched
    # to the pause at 2.0, and the next item starts at the speech after that pause, not at 2.5.
    spans = [(0.5, 2.0), (2.6, 4.0)]
    events: list[tuple[float, dict[str, Any]]] = [
        (2.7, _completed("a", "one", 2.0)),
        (4.6, _completed("b", "two", 1.5)),
        (4.7, {"type": "error", "error": {"code": "timeout", "message": "no result"}}),
    ]
    native = realtime_events(events, spans)
    assert [e.get("end_s") for _, e in native] == pytest.approx([2.5, 4.1, None])
    assert native[-1][1] == {"type": "error", "code": "timeout", "message": "no result"}
    assert score_clip("c", "one two", spans, native).latencies_s == pytest.approx([0.7, 0.6])


def test_realtime_audio_is_the_native_frames_at_24_khz() -> None:
    audio = np.sin(np.linspace(0, 200 * np.pi, 16_000 + 800)).astype(np.float32) * 0.5
    pieces = realtime_pieces(audio, pause_after_s=1.0)
    assert len(pieces) == 21  # 1.05 s of audio and 1 s of pause in 100 ms pieces
    assert all(len(p) == 4800 for p in pieces[:-1])  # 2400 samples of s16le
    assert len(pieces[-1]) == 2400
    samples = np.frombuffer(b"".join(pieces), "<i2")
    assert np.abs(samples[:24_000]).max() > 15_000  # the tone, at 24 kHz
    assert np.abs(samples[-12_000:]).max() < 50  # the pause
