"""The side-by-side benchmark's measuring loop, with stand-in engines (no models)."""

from __future__ import annotations

import numpy as np

from tests.bench.compare import Contender, measure


def test_engines_are_interleaved_clip_by_clip_in_rotating_order() -> None:
    clips = [(np.zeros(16_000 * (i + 1), dtype=np.float32), "red fox") for i in range(3)]
    calls: list[tuple[str, int]] = []

    def engine(name: str, text: str) -> Contender:
        def transcribe(audio: np.ndarray) -> str:
            calls.append((name, audio.size))
            return text

        return Contender(name, transcribe, lambda: 7 if name == "a" else 0)

    runs = measure([engine("a", "red fox"), engine("b", "red")], clips, passes=2)
    timed = calls[2:]  # one warm-up call each comes first
    assert [n for n, _ in calls[:2]] == ["a", "b"]
    # Clip by clip, each engine once, who goes first alternating.
    assert timed == [
        ("a", 16_000), ("b", 16_000), ("b", 32_000), ("a", 32_000), ("a", 48_000), ("b", 48_000),
        ("b", 16_000), ("a", 16_000), ("a", 32_000), ("b", 32_000), ("b", 48_000), ("a", 48_000),
    ]  # fmt: skip
    a, b = runs
    assert (a.name, a.clips, a.audio_s, a.fallbacks) == ("a", 3, 6.0, 7)
    assert len(a.per_clip_s) == 3
    assert a.compute_s == sum(a.per_clip_s)
    assert a.worst_clip_s == max(a.per_clip_s)
    # WER counted once (first pass), not once per pass.
    assert (a.errors, a.words) == (0, 6)
    assert (b.errors, b.words) == (3, 6)
