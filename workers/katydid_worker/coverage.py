"""Does a transcript cover the speech it was made from? Pure functions over times, for the engine.

Whisper ends a window's text when it believes the speech has ended, and whisper.cpp (after
OpenAI's reference loop) then skips the rest of the window: a run whose last token is a single
timestamp after text is taken to mean "nothing more is said here" (``single_timestamp_ending``
in ``whisper_full``). After a speaker change, a "...", a short phrase or a change of loudness
that belief is often wrong, and the rest of the window (measured: 14 s of a 20 s chunk of two
speakers) is never decoded. Nothing in the text shows it; the audio does. So the engine compares
its segments' times with where the voice activity detector heard speech, and decodes again
whatever speech no segment covers (``uncovered``). The check looks at the outcome, not at the
cause: a guard dropping segments, a cut in the wrong place or a sparse segment that stands for
more speech than its text holds are caught the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from katydid_worker.speech import Span

# Whisper's segment times are rough (a few hundred ms either side): a segment covers speech
# this far beyond its own times.
COVER_PAD_S = 0.3
# Uncovered speech closer than this to the next uncovered speech is one hole (one decode).
JOIN_S = 1.0
# A hole with at least this much voiced time is decoded again; shorter ones are breaths,
# clicks and the VAD's own slack, and a word of 0.5 s that whisper skipped is not worth a run.
MIN_HOLE_VOICED_S = 1.0
# After the last segment, where whisper's early end leaves its text (above), less is enough:
# speech the detector heard as stretches of their own (no segment touches them) is words once
# it lasts this long ("one, two" at the end of a window: 0.42 s and 0.45 s). Inside the text,
# such stretches are mostly the "um"s whisper leaves out on purpose, so the 1 s rule stands.
MIN_TAIL_VOICED_S = 0.35
# A segment whose text is this sparse for the voiced time it spans stands for more speech than
# it holds (read speech is ~12-16 characters per voiced second; whisper's summary of a passage
# it did not transcribe, "In this regard...", is far below).
MIN_CHARS_PER_VOICED_S = 4.0
MIN_SPARSE_VOICED_S = 3.0


class Timed(Protocol):
    """A segment's times and text, all the coverage check needs of it."""

    @property
    def start_s(self) -> float: ...
    @property
    def end_s(self) -> float: ...
    @property
    def text(self) -> str: ...


def voiced_in(start_s: float, end_s: float, spans: Sequence[Span]) -> float:
    """Seconds of speech (``spans``) within [start_s, end_s]."""
    return sum(max(0.0, min(end_s, s.end_s) - max(start_s, s.start_s)) for s in spans)


def _subtract(span: Span, covers: Sequence[tuple[float, float]]) -> list[Span]:
    """The parts of ``span`` outside every (start, end) of ``covers`` (sorted by start)."""
    parts: list[Span] = []
    at = span.start_s
    for start, end in covers:
        if end <= at or start >= span.end_s:
            continue
        if start > at:
            parts.append(Span(at, start))
        at = max(at, end)
    if at < span.end_s:
        parts.append(Span(at, span.end_s))
    return parts


def sparse(segment: Timed, spans: Sequence[Span]) -> bool:
    """The segment spans much more speech than its text can hold."""
    voiced = voiced_in(segment.start_s, segment.end_s, spans)
    return voiced >= MIN_SPARSE_VOICED_S and len(segment.text.strip()) / voiced < (
        MIN_CHARS_PER_VOICED_S
    )


def uncovered(
    spans: Sequence[Span],
    segments: Sequence[Timed],
    *,
    pad_s: float = COVER_PAD_S,
    join_s: float = JOIN_S,
    min_voiced_s: float = MIN_HOLE_VOICED_S,
    min_tail_s: float = MIN_TAIL_VOICED_S,
) -> list[Span]:
    """Stretches of speech no segment accounts for, each from its first to its last uncovered
    voiced moment, with at least ``min_voiced_s`` of speech in it, or, after the last segment,
    ``min_tail_s`` of speech in stretches no segment touches.

    A segment accounts for the speech within its times (widened by ``pad_s``) unless it is
    ``sparse``: then its speech counts as uncovered too.
    """
    covers = sorted((s.start_s - pad_s, s.end_s + pad_s) for s in segments if not sparse(s, spans))
    text_end = max((s.end_s for s in segments), default=math.inf)
    holes: list[list[tuple[Span, bool]]] = []  # (uncovered piece, a whole span of its own)
    for span in spans:
        parts = _subtract(span, covers)
        whole = parts == [span]
        for piece in parts:
            if holes and piece.start_s - holes[-1][-1][0].end_s < join_s:
                holes[-1].append((piece, whole))
            else:
                holes.append([(piece, whole)])
    found = []
    for group in holes:
        hole = Span(group[0][0].start_s, group[-1][0].end_s)
        voiced = sum(p.end_s - p.start_s for p, _ in group)
        own = sum(p.end_s - p.start_s for p, whole in group if whole)
        if voiced >= min_voiced_s or (hole.start_s >= text_end and own >= min_tail_s):
            found.append(hole)
    return found


def next_hole(
    spans: Sequence[Span],
    segments: Sequence[Timed],
    tried: Sequence[Span],
    *,
    min_tail_s: float = MIN_TAIL_VOICED_S,
) -> Span | None:
    """The first stretch of uncovered speech, outside every region already decoded again
    (``tried``), with enough speech in it to decode; None when there is none."""
    regions = sorted((t.start_s, t.end_s) for t in tried)
    text_end = max((s.end_s for s in segments), default=math.inf)
    for hole in uncovered(spans, segments, min_tail_s=min_tail_s):
        trailing = hole.start_s >= text_end
        least = min(min_tail_s, MIN_HOLE_VOICED_S) if trailing else MIN_HOLE_VOICED_S
        for part in _subtract(hole, regions):
            if voiced_in(part.start_s, part.end_s, spans) >= least:
                return part
    return None
