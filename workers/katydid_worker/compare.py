"""Katydid's engine against faster-whisper (int8, the engine of speaches, WhisperLive and
wyoming-faster-whisper) on the same clips, same thread count, one after the other in one run.

faster-whisper is an optional extra (``pip install 'katydid[bench]'``); it reads the same
CTranslate2 weights that Katydid converts, so both engines run the same model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from katydid.errors import KatydidError
from katydid.evaluation import word_errors
from katydid_worker.engine import SAMPLE_RATE, Engine, EngineOptions


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


def _measure(
    name: str, transcribe: Callable[[np.ndarray], str], clips: Sequence[tuple[np.ndarray, str]]
) -> EngineRun:
    run = EngineRun(name)
    transcribe(clips[0][0][:SAMPLE_RATE])  # warm-up, not timed
    for audio, reference in clips:
        started = time.perf_counter()
        text = transcribe(audio)
        took = time.perf_counter() - started
        errors, words = word_errors(reference, text)
        run.clips += 1
        run.audio_s += audio.size / SAMPLE_RATE
        run.compute_s += took
        run.errors += errors
        run.words += words
        run.worst_clip_s = max(run.worst_clip_s, took)
        run.per_clip_s.append(took)
    return run


def run_katydid(
    model_path: Path, clips: Sequence[tuple[np.ndarray, str]], options: EngineOptions
) -> EngineRun:
    engine = Engine(model_path, options)
    window = "clip-sized window" if options.clip_context else "full window"
    run = _measure(
        f"katydid ({model_path.name}, {window})", lambda a: engine.transcribe(a).text, clips
    )
    run.fallbacks = engine.fallbacks
    return run


def run_faster_whisper(
    ct2_dir: Path, clips: Sequence[tuple[np.ndarray, str]], *, threads: int, beam_size: int
) -> EngineRun:
    try:
        from faster_whisper import WhisperModel
    except ImportError:
        raise KatydidError(
            "faster-whisper is not installed: pip install 'katydid[bench]'"
        ) from None
    model = WhisperModel(str(ct2_dir), device="cpu", compute_type="int8", cpu_threads=threads)

    def transcribe(audio: np.ndarray) -> str:
        segments, _ = model.transcribe(audio, language="en", beam_size=beam_size)
        return " ".join(s.text for s in segments)

    return _measure(f"faster-whisper int8 beam {beam_size}", transcribe, clips)
