"""Guardrails for clip-sized audio context: choose the context, judge the output. Pure functions.

whisper.cpp's encoder processes a 30 s window (1500 positions, 50 per second) whatever the clip
length. ``audio_ctx`` shrinks the window to the clip, which makes short clips several times
cheaper, but the model was trained on full windows: with a tight context it can loop ("She had
your dark suit in greasy wash..." five times) or return nothing. So the engine decodes with a
clip-sized context and a compute budget, checks the output here, and falls back to the full
window when a check fails. A clip then costs at most its budget plus one full-context run.
"""

from __future__ import annotations

import math
import re
import zlib
from collections import Counter

import numpy as np

from katydid.audio import SAMPLE_RATE

FULL_CTX = 1500  # encoder positions in a 30 s window
POSITIONS_PER_S = 50
_FRAME = 480  # 30 ms, for the voiced-audio estimate

# Speech rarely exceeds ~4 words/s or ~25 characters/s; Whisper's own fallback uses a gzip
# compression ratio above 2.4 as the sign of a repetition loop.
MAX_CHARS_PER_S = 30.0
MIN_CHARS_FOR_RATE = 40
MAX_COMPRESSION_RATIO = 2.4
MIN_CHARS_FOR_RATIO = 60
MAX_NGRAM_REPEATS = 3  # the same 3-word sequence more than this many times
MIN_VOICED_S_FOR_TEXT = 1.0  # this much voiced audio should give some text


# Encoder sizes a clip may get, measured (tiny.en Q8_0, 1 thread, flash attention off; encoder
# ms): 256: 73, 320: 207, 384: 128, 448: 132, 512: 164, 576: 181, 640: 205, 704: 494, 768: 293,
# 832: 633, full window (flash on): 847. Some sizes hit slow kernels at 2-3x their neighbours'
# cost, so the steps are a measured list, not a stride. Below 384 clips of 2-3 s loop; past 640
# (11.8 s of clip) encoder plus decoding no longer fits safely in the budget (see
# attempt_budget_s: at 768 the encoder alone is ~0.4 of the full window's).
CLIP_CTX_STEPS = (384, 448, 512, 576, 640)


def attempt_budget_s(full_s: float, empty_s: float, ratio: float = 0.5) -> float:
    """CPU seconds a clip-sized attempt may take before it is abandoned for the full window.

    ``full_s``: a near-empty clip's full-window run (the encoder's fixed cost); ``empty_s``: a
    near-empty clip's run at the attempt's size. A clip's own full-window time is ``full_s``
    plus decoding its text, which the attempt decodes too: an attempt that has spent ``x``
    has done ``x - empty_s`` of that decoding, so it is within ``ratio`` x its own full-window
    time while ``x <= ratio * (full_s + x - empty_s)``, i.e. up to
    ``ratio / (1 - ratio) * (full_s - empty_s)`` (never less than ``ratio * full_s``, the
    bound for a clip with no text). Attempt plus fallback then stay within ``1 + ratio`` x the
    clip's full-window time whenever the full window decodes at least the attempt's text. With
    ``ratio`` 0.5 (the default) an attempt that loops where the full window would not stops
    below one near-empty full window, so such a clip stays under twice its full-window time.

    A budget of ``ratio * full_s`` alone (the earlier rule) gave up on text-dense clips (7-11 s
    read speech: 0.5-0.55 of a near-empty full window, 0.45-0.5 of their own) whenever this
    host ran slower than when it was measured, and paid for both runs: 13% of the seed load's
    jobs and a third of its engine time.
    """
    if ratio <= 0:
        raise ValueError("the attempt's ratio must be positive")
    if ratio >= 1:
        return math.inf  # as dear as the full window or more: no reason to stop it
    return max(ratio * full_s, ratio / (1 - ratio) * (full_s - empty_s))


def choose_audio_ctx(
    duration_s: float, *, margin_s: float = 1.0, steps: tuple[int, ...] = CLIP_CTX_STEPS
) -> int:
    """Encoder context for a clip: the smallest of ``steps`` that holds it plus a margin.

    Measured on the shared clips (tiny.en): below 384 positions (7.7 s) clips of 2-3 s loop
    ("Go forward 10 meters." forty times); at 384 they do not, and cost ~0.2 s instead of ~1 s.

    Returns:
        Positions for ``audio_ctx``, or ``FULL_CTX`` when no step holds the clip.
    """
    needed = math.ceil((max(0.0, duration_s) + margin_s) * POSITIONS_PER_S)
    return next((step for step in sorted(steps) if step >= needed), FULL_CTX)


# What whisper writes for sounds that are not words: [BLANK_AUDIO], [ Silence ], (music),
# (phone ringing), *laughs*, ♪. Decoding suppresses the tokens that open them (suppress_nst);
# this catches what gets through. A transcript of speech has no brackets or asterisks to lose.
_MARKER = re.compile(r"\[[^\]]*\]?|\([^)]*\)?|\*[^*]*\*|[♪♫♬]+|<\|[^|]*\|>")
_SPACES = re.compile(r"\s{2,}")


def strip_markers(text: str) -> str:
    """The text without non-speech markers (bracketed, parenthesised, starred, music notes)."""
    if not any(c in text for c in "[(*♪♫♬<"):
        return text
    return _SPACES.sub(" ", _MARKER.sub(" ", text)).strip()


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def max_ngram_repeats(text: str, n: int = 3) -> int:
    words = re.findall(r"[\w']+", text.lower())
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return max(grams.values(), default=0)


def tail_repeat(text: str, max_words: int = 30) -> int:
    """How many words the text ends with twice in a row ("In this regard, this regard."): a
    clip-sized window's typical echo of its last phrase, 0 if none. One repeated word
    ("very very") is speech; two or more at the very end rarely are. The echo may be a whole
    sentence ("It was the first great sorrow of his life." twice, the second in the last 0.2 s
    of a 6 s clip): up to ``max_words`` (8 missed that one)."""
    words = re.findall(r"[\w']+", text.lower())
    for n in range(2, min(max_words, len(words) // 2) + 1):
        if words[-n:] == words[-2 * n : -n]:
            return n
    return 0


def voiced_seconds(audio: np.ndarray) -> float:
    """Rough voiced duration: 30 ms frames louder than both a floor and 26 dB under the peak."""
    n = audio.size // _FRAME
    if n == 0:
        return 0.0
    rms = np.sqrt(
        np.mean(np.square(audio[: n * _FRAME].reshape(n, _FRAME), dtype=np.float64), axis=1)
    )
    threshold = max(float(rms.max()) * 0.05, 1e-3)
    return float((rms > threshold).sum()) * _FRAME / SAMPLE_RATE


def check_output(text: str, duration_s: float, voiced_s: float) -> str | None:
    """Why this transcript looks wrong for this audio, or None if it passes every check.

    Returns:
        ``"empty"``, ``"too_long"``, ``"compression"``, ``"repetition"`` or ``"tail_repeat"``.
    """
    stripped = text.strip()
    if not stripped:
        return "empty" if voiced_s >= MIN_VOICED_S_FOR_TEXT else None
    if (
        len(stripped) >= MIN_CHARS_FOR_RATE
        and len(stripped) / max(duration_s, 0.5) > MAX_CHARS_PER_S
    ):
        return "too_long"
    if len(stripped) >= MIN_CHARS_FOR_RATIO and compression_ratio(stripped) > MAX_COMPRESSION_RATIO:
        return "compression"
    if max_ngram_repeats(stripped) > MAX_NGRAM_REPEATS:
        return "repetition"
    if tail_repeat(stripped):
        return "tail_repeat"
    return None
