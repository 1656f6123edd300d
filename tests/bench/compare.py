"""Katydid's engine against faster-whisper (int8, the engine of speaches, WhisperLive and
wyoming-faster-whisper) on the same clips, same thread count, one after the other in one run.

faster-whisper is an optional extra (``pip install 'katydid[bench]'``); it reads the same
CTranslate2 weights that Katydid converts, so both engines run the same model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from katydid.audio import SAMPLE_RATE
from katydid.errors import KatydidError
from katydid.evaluation import word_errors
from katydid_worker.engine import Engine
from katydid_worker.engine_options import EngineOptions


@dataclass(slots=True)
class EngineRun:
    name: str
    clips: int = 0
    audio_s: float = 0.0
    compute_s: float = 0.0
    errors: int = 0
    words: int = 0
    worst_clip_s: float = 0.0
    fallbacks: int = 0
    per_clip_s: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # per clip, first pass

    @property
    def wer(self) -> float:
        return self.errors / self.words if self.words else 0.0

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.compute_s if self.compute_s else 0.0

    def as_dict(self) -> dict[str, float | str | int]:
        return {
            "name": self.name,
            "clips": self.clips,
            "wer": round(self.wer, 5),
            "clips_per_s": round(self.clips_per_s, 3),
            "audio_s_per_s": round(self.audio_s / self.compute_s, 3) if self.compute_s else 0.0,
            "compute_s": round(self.compute_s, 3),
            "worst_clip_s": round(self.worst_clip_s, 3),
            "fallbacks": self.fallbacks,
        }


@dataclass(frozen=True, slots=True)
class Contender:
    """One engine set-up in the comparison: a name and a loaded model's transcribe call."""

    name: str
    transcribe: Callable[[np.ndarray], str]
    fallbacks: Callable[[], int] = lambda: 0


def katydid(model_path: Path, options: EngineOptions) -> Contender:
    engine = Engine(model_path, options)
    window = "clip-sized window" if options.clip_context else "full window"
    if options.clip_context and options.pieces:
        window += ", long speech in pieces"
    return Contender(
        f"katydid ({model_path.name}, {window})",
        lambda a: engine.transcribe(a).text,
        lambda: engine.fallbacks,
    )


def faster_whisper(ct2_dir: Path, *, threads: int, beam_sizes: Sequence[int]) -> list[Contender]:
    """faster-whisper int8 on the same CTranslate2 weights, one contender per beam size."""
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        raise KatydidError(
            "faster-whisper is not installed: pip install 'katydid[bench]'"
        ) from None
    model = WhisperModel(str(ct2_dir), device="cpu", compute_type="int8", cpu_threads=threads)

    def contender(beam_size: int) -> Contender:
        def transcribe(audio: np.ndarray) -> str:
            segments, _ = model.transcribe(audio, language="en", beam_size=beam_size)
            return " ".join(s.text for s in segments)

        return Contender(f"faster-whisper int8 beam {beam_size}", transcribe)

    return [contender(b) for b in beam_sizes]


def measure(
    contenders: Sequence[Contender],
    clips: Sequence[tuple[np.ndarray, str | None]],
    *,
    passes: int = 1,
) -> list[EngineRun]:
    """Time every contender on every clip, interleaved: clip by clip, each contender in turn,
    the order rotating from clip to clip and pass to pass. This machine's speed drifts by 10-30%
    over a minute; run one after the other, a ratio between engines measured that drift too.

    A clip's time is its median over ``passes``; WER comes from the first pass (both engines
    decode deterministically), for clips with a reference (a piece cut from a longer recording
    has none: its text is kept, in ``texts``, to be scored with the rest of the recording).
    """
    for c in contenders:
        c.transcribe(clips[0][0][:SAMPLE_RATE])  # warm-up, not timed
    times: dict[str, list[list[float]]] = {c.name: [[] for _ in clips] for c in contenders}
    runs = {c.name: EngineRun(c.name) for c in contenders}
    for p in range(passes):
        for i, (audio, reference) in enumerate(clips):
            turn = (i + p) % len(contenders)
            for c in [*contenders[turn:], *contenders[:turn]]:
                started = time.perf_counter()
                text = c.transcribe(audio)
                times[c.name][i].append(time.perf_counter() - started)
                if p == 0:
                    runs[c.name].texts.append(text)
                    if reference is not None:
                        errors, words = word_errors(reference, text)
                        runs[c.name].errors += errors
                        runs[c.name].words += words
    for c in contenders:
        run = runs[c.name]
        run.per_clip_s = [statistics.median(t) for t in times[c.name]]
        run.clips = len(clips)
        run.audio_s = sum(audio.size for audio, _ in clips) / SAMPLE_RATE
        run.compute_s = sum(run.per_clip_s)
        run.worst_clip_s = max(run.per_clip_s)
        run.fallbacks = c.fallbacks()
    return [runs[c.name] for c in contenders]
