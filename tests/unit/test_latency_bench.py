"""The latency benchmark's scoring, on crafted event timelines (the run itself: nox -s latency)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bench.latency import (
    ClipLatency,
    markdown_streams,
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
