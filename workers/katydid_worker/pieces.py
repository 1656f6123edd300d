"""Where the engine cuts an utterance too long for a clip-sized window: in its pauses. Pure.

Past the largest clip size (640 positions: 11.8 s of speech and the margin) a clip needs
whisper.cpp's full 30 s window, whose encoder alone costs about three of a 640-position run's
(guardrails.py). Clip-sized runs over a 12-30 s utterance, cut where the speaker paused, cost
~0.65-0.8 of one full window; they hear a word or two in 200 differently (the full window is
the more accurate on such utterances: docs/engine.md), so finals use them only when asked
(``engine_pieces``), partials always. The gateway cuts long files the same way
(`file_chunk_min_s`..`file_chunk_max_s`). Whisper hears each piece as an utterance of its own,
so a cut inside a word would cost that word; a pause has none to lose.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from katydid_worker.speech import Span


def cut_at_pauses(
    spans: Sequence[Span], start_s: float, end_s: float, *, max_s: float, min_s: float
) -> list[tuple[float, float]]:
    """Pieces of [start_s, end_s), each cut in the middle of a pause between two ``spans`` of
    speech, at most ``max_s`` long where the pauses allow it.

    Each cut is in the longest pause that leaves a piece of ``min_s`` to ``max_s`` on both sides
    (the later of equal ones: longer pieces keep more context); failing that, the longest that
    leaves ``min_s`` to ``max_s`` before it; then the longest within ``max_s``; then the first
    pause past ``max_s`` (that piece is decoded in the full window, the rest may still fit
    clip-sized ones). Without a pause the rest is one piece. The pieces tile the interval: no
    audio is left out or decoded twice.
    """
    if max_s <= 0 or min_s < 0:
        raise ValueError("need max_s > 0 and min_s >= 0")
    pauses = [
        (b.start_s - a.end_s, (a.end_s + b.start_s) / 2)
        for a, b in pairwise(spans)
        if b.start_s > a.end_s
    ]
    pieces: list[tuple[float, float]] = []
    at = start_s
    while end_s - at > max_s:
        within = [p for p in pauses if at < p[1] <= at + max_s]
        long_enough = [p for p in within if p[1] - at >= min_s]
        both = [p for p in long_enough if end_s - p[1] >= min_s]
        later = [p for p in pauses if p[1] > at + max_s]
        if within:
            cut = max(both or long_enough or within)[1]
        elif later:
            cut = later[0][1]
        else:
            break
        pieces.append((at, cut))
        at = cut
    pieces.append((at, end_s))
    return pieces
