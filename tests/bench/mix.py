"""A benchmark mix with live traffic's utterance lengths: clips of 2-30 s, long recordings cut at
pauses as the gateway cuts them, reported per length bucket.

Live speech reaches the engine as utterances cut at pauses, from a second or two to Whisper's
30 s window; an engine that is fast on 3-5 s clips may not be on 12-30 s ones (the encoder window
and the decoder's length both grow). A clip of up to 30 s is used whole, with its reference. A
longer recording is cut twice, at pauses (``Chunker``): into 2-12 s utterances (the live cut) and
into 12-30 s ones (a speaker who does not pause, or a file); each cut's pieces have no reference
of their own, so their texts are joined in order and scored against the recording's reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from katydid.audio import SAMPLE_RATE, float_to_int16
from katydid.chunker import Chunker
from katydid.evaluation import word_errors

BUCKETS = (("<=5 s", 0.0, 5.0), ("5-12 s", 5.0, 12.0), ("12-30 s", 12.0, 30.0))
# How a long recording is cut: (min_s, max_s) of each cut.
CUTS = ((2.0, 12.0), (12.0, 30.0))


@dataclass(frozen=True, slots=True)
class MixClip:
    name: str
    audio: np.ndarray  # float32 16 kHz
    reference: str | None  # None: a piece of a longer recording
    group: str  # the recording and cut it belongs to (scored together)
    recording: str

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE

    @property
    def bucket(self) -> str:
        return bucket_of(self.duration_s)


def bucket_of(duration_s: float) -> str:
    for name, low, high in BUCKETS:
        if low < duration_s <= high:
            return name
    return BUCKETS[-1][0] if duration_s > 0 else BUCKETS[0][0]


def build(clips: Sequence[tuple[str, np.ndarray, str]], *, max_s: float = 30.0) -> list[MixClip]:
    """The mix: whole clips up to ``max_s``, and every longer recording cut each way of CUTS."""
    out: list[MixClip] = []
    for name, audio, reference in clips:
        if audio.size / SAMPLE_RATE <= max_s:
            out.append(MixClip(name, audio, reference, name, name))
            continue
        pcm = float_to_int16(audio)
        for low, high in CUTS:
            chunker = Chunker(min_s=low, max_s=high, silence_s=0.3)
            group = f"{name} cut {low:g}-{high:g} s"
            for c in chunker.feed(pcm) + chunker.flush():
                piece = c.audio.astype(np.float32) / 32768.0
                out.append(MixClip(f"{name}@{c.offset_s:.1f}", piece, None, group, name))
    return out


def pooled_errors(
    mix: Sequence[MixClip], texts: Sequence[str], references: dict[str, str]
) -> tuple[int, int]:
    """(errors, words) over the whole mix: whole clips alone, cut pieces joined per group."""
    joined: dict[str, list[str]] = {}
    errors = words = 0
    for clip, text in zip(mix, texts, strict=True):
        if clip.reference is not None:
            e, w = word_errors(clip.reference, text)
            errors, words = errors + e, words + w
        else:
            joined.setdefault(clip.group, []).append(text)
    for group, parts in joined.items():
        e, w = word_errors(references[group], " ".join(parts))
        errors, words = errors + e, words + w
    return errors, words


def group_references(
    clips: Sequence[tuple[str, np.ndarray, str]], mix: Sequence[MixClip]
) -> dict[str, str]:
    by_name = {name: reference for name, _, reference in clips}
    return {m.group: by_name[m.recording] for m in mix if m.reference is None}
