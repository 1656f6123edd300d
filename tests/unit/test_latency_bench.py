"""The latency benchmark's scoring, on crafted event timelines (the run itself: nox -s latency)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.bench.latency import report, score_clip, utterances


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
