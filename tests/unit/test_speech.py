"""Voice activity spans and the non-speech marker filter (pure), and the detector on signals."""

from __future__ import annotations

import numpy as np
import pytest

from katydid_worker.guardrails import strip_markers
from katydid_worker.speech import (
    WINDOW,
    Span,
    SpeechDetector,
    SpeechRules,
    overlap_s,
    spans_from_probabilities,
)

W = WINDOW / 16_000  # seconds per window


def test_spans_start_at_threshold_and_end_after_enough_quiet() -> None:
    probs = np.array([0.1] * 5 + [0.9] * 10 + [0.1] * 2 + [0.9] * 5 + [0.1] * 10, dtype=np.float32)
    # A 2-window dip (64 ms) is shorter than min_silence (100 ms): one span.
    (span,) = spans_from_probabilities(probs)
    assert span.start_s == pytest.approx(5 * W)
    assert span.end_s == pytest.approx(22 * W)


def test_a_long_dip_splits_and_a_blip_is_dropped() -> None:
    probs = np.array([0.9] * 10 + [0.0] * 10 + [0.9] * 1 + [0.0] * 10 + [0.9] * 8, dtype=np.float32)
    spans = spans_from_probabilities(probs, SpeechRules(min_speech_s=0.1))
    assert [(round(s.start_s / W), round(s.end_s / W)) for s in spans] == [(0, 10), (31, 39)]


def test_hysteresis_keeps_speech_between_the_two_thresholds() -> None:
    probs = np.array([0.9] * 5 + [0.4] * 20 + [0.1] * 10, dtype=np.float32)
    (span,) = spans_from_probabilities(probs)
    assert round(span.end_s / W) == 25  # 0.4 is above the off threshold (0.35)


def test_no_speech_no_spans() -> None:
    assert spans_from_probabilities(np.zeros(100, dtype=np.float32)) == []
    assert spans_from_probabilities(np.zeros(0, dtype=np.float32)) == []


def test_overlap_with_padding() -> None:
    spans = [Span(1.0, 2.0), Span(3.0, 4.0)]
    assert overlap_s(0.0, 5.0, spans) == pytest.approx(2.0)
    assert overlap_s(2.0, 3.0, spans) == 0.0
    assert overlap_s(2.0, 3.0, spans, pad_s=0.1) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[BLANK_AUDIO]", ""),
        ("[ Silence ]", ""),
        ("(music)", ""),
        ("(phone ringing) Hello there.", "Hello there."),
        ("Yes *laughs* sure ♪♪", "Yes sure"),
        ("<|endoftext|>", ""),
        ("Plain words, kept as they are.", "Plain words, kept as they are."),
    ],
)
def test_markers_are_stripped(text: str, expected: str) -> None:
    assert strip_markers(text) == expected


def _tone(seconds: float, freqs: list[float]) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return np.asarray(0.1 * sum(np.sin(2 * np.pi * f * t) for f in freqs), dtype=np.float32)


def test_detector_hears_nobody_in_silence_noise_or_tones() -> None:
    detector = SpeechDetector()
    rng = np.random.default_rng(7)
    noise = (rng.standard_normal(5 * 16_000) * 10 ** (-30 / 20)).astype(np.float32)
    for audio in (np.zeros(5 * 16_000, np.float32), noise, _tone(5, [261.6, 329.6, 392.0])):
        assert detector.spans(audio) == []
    probs = detector.probabilities(np.zeros(1000, np.float32))
    assert probs.shape == (2,)  # a partial last window counts
