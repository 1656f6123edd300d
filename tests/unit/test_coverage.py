"""The coverage guard: speech a decode left without text is decoded again, or reported.

The engine here is real but for whisper.cpp: ``_run`` is a stub that behaves as whisper does when
it ends a window's text early (text for the speech in the first half of whatever window it is
given, nothing after), and the speech detector is a stub that hears every non-zero sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from katydid.audio import SAMPLE_RATE
from katydid_worker.coverage import next_hole, sparse, uncovered
from katydid_worker.engine import Engine
from katydid_worker.engine_options import DecodeOptions, EngineOptions
from katydid_worker.speech import Span
from katydid_worker.transcript import Segment


def _runs(audio: np.ndarray) -> list[Span]:
    """Where the samples are non-zero, as spans (the stubs' notion of speech)."""
    voiced = np.concatenate(([0], (audio != 0).astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(voiced))
    return [
        Span(a / SAMPLE_RATE, b / SAMPLE_RATE)
        for a, b in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True)
    ]


@dataclass(frozen=True)
class _Raw:
    t0: int  # 10 ms ticks, as whisper.cpp reports them
    t1: int
    text: str


class _Detector:
    def spans(self, audio: np.ndarray) -> list[Span]:
        return _runs(audio)


class _EarlyStopper(Engine):
    """An Engine whose whisper stops after the first half of every window (``keep``: the
    fraction of the window it transcribes), and never writes text for speech it cannot make
    out (negative samples: see ``_speech``)."""

    def __init__(self, keep: float = 0.5) -> None:
        self.options = EngineOptions(clip_context=False, speech_pad_s=0.3)
        self.default_decode = self._decode = DecodeOptions()
        self.multilingual = False
        self.fallbacks = 0
        self.redecodes = 0
        self._speech: Any = _Detector()
        self.keep = keep
        self.windows: list[float] = []  # each run's length, seconds

    def _run(self, audio: np.ndarray, **_kwargs: Any) -> list[Any]:
        length_s = audio.size / SAMPLE_RATE
        self.windows.append(length_s)
        out = []
        for span in _runs(audio):
            if span.start_s >= self.keep * length_s:
                break  # whisper's "single timestamp ending": the rest is never decoded
            if audio[int(span.start_s * SAMPLE_RATE)] < 0:
                continue  # speech it cannot make out
            words = " ".join(["word"] * max(1, round(3 * (span.end_s - span.start_s))))
            out.append(_Raw(round(span.start_s * 100), round(span.end_s * 100), words))
        return out


def _speech(
    *spans_s: tuple[float, float], total_s: float, mumbled_from_s: float = np.inf
) -> np.ndarray:
    """A clip that is non-zero where each span speaks (negative from ``mumbled_from_s`` on:
    speech the stub whisper cannot make out), zeros elsewhere."""
    audio = np.zeros(int(total_s * SAMPLE_RATE), dtype=np.float32)
    for start, end in spans_s:
        audio[int(start * SAMPLE_RATE) : int(end * SAMPLE_RATE)] = (
            -0.1 if start >= mumbled_from_s else 0.1
        )
    return audio


SPEAKERS = ((0.5, 4.0), (5.0, 9.0), (10.0, 13.5), (14.5, 18.0))  # four passages over 19 s


def _covered_s(segments: tuple[Segment, ...], spans: tuple[tuple[float, float], ...]) -> float:
    return sum(max(0.0, min(e, s.end_s) - max(a, s.start_s)) for a, e in spans for s in segments)


def test_speech_after_an_early_end_of_text_is_decoded_again_until_covered() -> None:
    engine = _EarlyStopper(keep=0.5)
    tr = engine.transcribe(_speech(*SPEAKERS, total_s=19.0))
    # One run alone covers only the first two passages (the bug: 9 of 14 s of speech dropped).
    voiced = sum(e - a for a, e in SPEAKERS)
    assert _covered_s(tr.segments, SPEAKERS) >= voiced - 0.1
    assert tr.redecodes >= 1
    assert tr.fallback is not None
    assert "uncovered" in tr.fallback
    assert tr.uncovered == ()
    assert engine.redecodes == tr.redecodes
    # Each later run sees only what was left, never the whole clip again.
    assert all(w < engine.windows[0] for w in engine.windows[1:])
    starts = [s.start_s for s in tr.segments]
    assert starts == sorted(starts)


def test_speech_that_still_gets_no_text_is_reported_not_dropped() -> None:
    engine = _EarlyStopper(keep=1.0)
    tr = engine.transcribe(_speech(*SPEAKERS, total_s=19.0, mumbled_from_s=10.0))
    assert tr.uncovered == ((10.0, 13.5), (14.5, 18.0))
    assert tr.redecodes == 2  # each stretch had its second chance, once


def test_redecodes_are_bounded() -> None:
    engine = _EarlyStopper(keep=0.01)  # never any text: every stretch is a hole
    engine.options = EngineOptions(clip_context=False, max_redecodes=2)
    tr = engine.transcribe(_speech(*SPEAKERS, total_s=19.0))
    assert tr.redecodes == 2
    assert len(engine.windows) == 3
    assert tr.uncovered  # said, not silence


def test_a_hole_is_speech_no_segment_covers() -> None:
    spans = [Span(0.0, 4.0), Span(5.0, 9.0), Span(9.8, 10.2)]
    seg = Segment(0.0, 4.1, "a sentence that covers the first span of speech")
    # The second span is a hole; the 0.4 s one after it is joined to it (within JOIN_S).
    assert uncovered(spans, [seg]) == [Span(5.0, 10.2)]
    # Short uncovered speech (a breath, a click) is not a hole.
    assert uncovered([Span(0.0, 4.0), Span(6.0, 6.3)], [seg]) == []


def test_short_words_after_the_last_segment_are_a_hole() -> None:
    # "one, two" after the text ended (0.42 s and 0.45 s of their own): whisper stopped early.
    spans = [Span(0.0, 4.0), Span(5.0, 5.42), Span(6.0, 6.45)]
    seg = Segment(0.0, 4.1, "a sentence that covers the first span of speech")
    assert uncovered(spans, [seg]) == [Span(5.0, 6.45)]
    assert next_hole(spans, [seg], []) == Span(5.0, 6.45)
    # Between segments the same short stretches are what whisper leaves out on purpose ("um").
    later = Segment(7.0, 9.0, "more text after them")
    assert uncovered([*spans, Span(7.0, 9.0)], [seg, later]) == []
    # A word's edge the segment's times missed is not a stretch of its own, however long.
    assert uncovered([Span(0.0, 5.0)], [seg]) == []


def test_a_short_phrase_after_an_early_end_of_text_is_decoded_again() -> None:
    engine = _EarlyStopper(keep=0.7)
    tr = engine.transcribe(_speech((0.5, 6.0), (7.0, 7.42), (8.0, 8.45), total_s=9.0))
    assert tr.redecodes == 1
    assert _covered_s(tr.segments, ((7.0, 7.42), (8.0, 8.45))) >= 0.8
    assert tr.uncovered == ()


def test_a_partial_s_short_tail_is_speech_still_being_said() -> None:
    # A partial's audio ends while the speaker talks: a second decode of its last word would
    # only delay the preview (its final decodes it).
    engine = _EarlyStopper(keep=0.7)
    clip = _speech((0.5, 6.0), (7.0, 7.42), (8.0, 8.45), total_s=9.0)
    tr = engine.transcribe(clip, decode=DecodeOptions(preview=True))
    assert tr.redecodes == 0
    assert tr.uncovered == ()


def test_a_sparse_segment_does_not_cover_its_speech() -> None:
    spans = [Span(0.0, 14.0)]
    short = Segment(0.0, 14.0, "In this regard...")  # 17 characters for 14 s of speech
    assert sparse(short, spans)
    assert uncovered(spans, [short]) == [Span(0.0, 14.0)]
    full = Segment(0.0, 14.0, "x" * 170)
    assert not sparse(full, spans)
    assert uncovered(spans, [full]) == []


def test_next_hole_skips_what_was_tried() -> None:
    spans = [Span(0.0, 4.0), Span(5.0, 9.0), Span(12.0, 15.0)]
    assert next_hole(spans, [], []) == Span(0.0, 4.0)
    assert next_hole(spans, [], [Span(0.0, 4.5)]) == Span(5.0, 9.0)
    assert next_hole(spans, [], [Span(0.0, 9.5)]) == Span(12.0, 15.0)
    assert next_hole(spans, [], [Span(0.0, 15.0)]) is None
