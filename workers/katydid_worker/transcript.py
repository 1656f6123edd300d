"""What the engine returns: a transcript of one clip, its segments and their words, in the
clip's time (seconds from its first sample)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Word:
    start_s: float
    end_s: float
    text: str
    probability: float


@dataclass(frozen=True, slots=True)
class Segment:
    start_s: float
    end_s: float
    text: str
    words: tuple[Word, ...] = ()


@dataclass(frozen=True, slots=True)
class Transcript:
    segments: tuple[Segment, ...]
    language: str
    audio_s: float
    compute_s: float
    audio_ctx: int = 1500  # encoder positions used by the run that produced it (1500 = 30 s)
    # Why the first run's text was not kept as it came: "budget", a guardrail's reason (the
    # clip-sized run was discarded for a full-window one), "uncovered" (speech no segment
    # covered was decoded again), joined by "+".
    fallback: str | None = None
    redecodes: int = 0  # runs over speech the first run left without text
    # Stretches of speech (start_s, end_s in the clip) that still have no text after their
    # second decode: said, never silently dropped.
    uncovered: tuple[tuple[float, float], ...] = ()

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.text).strip()

    @property
    def rtf(self) -> float:
        """Real-time factor: compute seconds per audio second (lower is faster)."""
        return self.compute_s / self.audio_s if self.audio_s > 0 else math.nan
