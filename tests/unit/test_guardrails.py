"""Clip-sized context choice and the output checks, on crafted transcripts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from katydid_worker.guardrails import (
    FULL_CTX,
    attempt_budget_s,
    check_output,
    choose_audio_ctx,
    compression_ratio,
    max_ngram_repeats,
    tail_repeat,
    voiced_seconds,
)


@pytest.mark.parametrize(
    ("duration_s", "expected"),
    [
        (0.5, 384),
        (2.9, 384),
        (6.6, 384),
        (6.7, 448),
        (7.9, 448),
        (8.0, 512),
        (9.3, 576),
        (11.8, 640),
        (11.9, FULL_CTX),
        (28.0, FULL_CTX),
    ],
)
def test_context_is_the_smallest_step_holding_the_clip_plus_margin(
    duration_s: float, expected: int
) -> None:
    ctx = choose_audio_ctx(duration_s, margin_s=1.0)
    assert ctx == expected
    assert ctx == FULL_CTX or ctx >= (duration_s + 1.0) * 50
    assert choose_audio_ctx(5.0, margin_s=1.0, steps=(256, 1024)) == 1024


def test_looped_transcript_fails() -> None:
    loop = "She had your doc suit in greasy wash for all year. " * 5
    assert check_output(loop, duration_s=2.9, voiced_s=2.5) in (
        "too_long",
        "compression",
        "repetition",
    )
    assert compression_ratio(loop) > 2.4
    assert max_ngram_repeats(loop) == 5


def test_repetition_caught_even_when_short_and_not_too_dense() -> None:
    text = (
        "go forward ten meters, go forward ten meters, go forward ten meters, go forward ten meters"
    )
    assert check_output(text, duration_s=20.0, voiced_s=10.0) in ("compression", "repetition")
    assert max_ngram_repeats(text) == 4


def test_an_echo_of_the_last_phrase_fails() -> None:
    # tiny.en at 448 positions on a 7.7 s read sentence; the full window ends "In this regard,"
    echo = "activities there under. In this regard, this regard."
    assert check_output(echo, duration_s=7.7, voiced_s=6.0) == "tail_repeat"
    assert tail_repeat(echo) == 2
    # A repeated word, or a phrase said twice but not at the end, is speech.
    assert tail_repeat("it was very very cold") == 0
    sentence = "It was the first great sorrow of his life."
    assert tail_repeat(f"Ask what you can do for your country. {sentence} {sentence}") == 9
    assert tail_repeat("ask what you can do, ask what you can do for your country") == 0
    assert check_output("it was very very cold", duration_s=2.0, voiced_s=1.5) is None


def test_empty_transcript_fails_only_for_voiced_audio() -> None:
    assert check_output("", duration_s=5.0, voiced_s=4.0) == "empty"
    assert check_output("  ", duration_s=5.0, voiced_s=0.2) is None


def test_too_long_for_the_audio_fails() -> None:
    text = "a perfectly varied sentence with many different words appearing only once in it overall"
    assert check_output(text, duration_s=1.0, voiced_s=1.0) == "too_long"


def test_normal_transcripts_pass() -> None:
    jfk = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
    assert check_output(jfk, duration_s=11.0, voiced_s=9.0) is None
    assert check_output("one two three", duration_s=2.7, voiced_s=1.5) is None


def test_voiced_seconds_counts_loud_frames() -> None:
    t = np.arange(32_000) / 16_000
    audio = np.where(t < 1.0, 0.3 * np.sin(2 * np.pi * 200 * t), 0.0).astype(np.float32)
    assert voiced_seconds(audio) == pytest.approx(1.0, abs=0.05)
    assert voiced_seconds(np.zeros(100, dtype=np.float32)) == 0.0


@pytest.mark.parametrize("empty_s", [0.15, 0.2, 0.3, 0.45])
def test_an_attempt_within_its_budget_costs_at_most_half_its_own_full_window(
    empty_s: float,
) -> None:
    full_s = 1.0  # a near-empty clip's full window; a clip's own adds its decoding, text_s
    budget = attempt_budget_s(full_s, empty_s, 0.5)
    assert 0.5 * full_s <= budget < full_s  # a loop stops before one near-empty full window
    for text_s in np.linspace(0.0, 2.0, 81):
        attempt = empty_s + text_s  # the attempt decodes the same text on a smaller window
        if attempt <= budget:
            # attempt + fallback <= 1.5x the clip's own full-window time
            assert attempt + (full_s + text_s) <= 1.5 * (full_s + text_s) + 1e-9
    # ...and the budget is the largest that keeps it: a text-dense clip gets its own room.
    text_at_edge = budget - empty_s
    assert budget == pytest.approx(0.5 * (full_s + text_at_edge))


def test_the_budget_has_a_floor_and_no_limit_past_a_whole_window() -> None:
    # An attempt whose empty run costs over half the full window: the plain half-window bound.
    assert attempt_budget_s(1.0, 0.7, 0.5) == pytest.approx(0.5)
    assert attempt_budget_s(1.0, 0.2, 0.6) == pytest.approx(1.2)
    assert attempt_budget_s(1.0, 0.2, 1.0) == math.inf
    with pytest.raises(ValueError, match="positive"):
        attempt_budget_s(1.0, 0.2, 0.0)
