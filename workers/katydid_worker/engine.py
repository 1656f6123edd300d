"""The speech recogniser: a ggml Whisper model loaded once, transcribing 16 kHz mono float32.

Rule 1: an Engine is used by one thread at a time (whisper.cpp's context is not re-entrant);
pywhispercpp releases the GIL inside ``whisper_full``, so other threads and the event loop run
while it transcribes. A worker holds one Engine and calls it from one thread.

Rule 2: the engine never prints, never downloads. pywhispercpp's ``Model(name)`` downloads when the
argument is not an existing file, so the path is checked here first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from katydid.errors import EngineError, ModelError

SAMPLE_RATE = 16_000
_TICK_S = 0.01  # whisper.cpp reports times in 10 ms ticks


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

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.text).strip()

    @property
    def rtf(self) -> float:
        """Real-time factor: compute seconds per audio second (lower is faster)."""
        return self.compute_s / self.audio_s if self.audio_s > 0 else math.nan


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Decoding options; defaults are whisper.cpp's greedy defaults, measured best per CPU second."""

    language: str = "en"
    threads: int = 1
    beam_size: int = 0  # 0 = greedy
    word_timestamps: bool = False
    initial_prompt: str | None = None


class Engine:
    """One loaded whisper.cpp model.

    Args:
        model_path: a prepared ggml file (see ``katydid model prepare``).
        options: decoding options applied to every call unless overridden.

    Raises:
        ModelError: the file does not exist (names the command that prepares it).
    """

    def __init__(self, model_path: Path, options: EngineOptions | None = None) -> None:
        if not model_path.is_file():
            raise ModelError(f"model file {model_path} not found; run: katydid model prepare")
        from pywhispercpp.model import Model  # imported late: it loads a native library

        self.options = options or EngineOptions()
        self.model_path = model_path
        self._model = Model(
            str(model_path),
            params_sampling_strategy=1 if self.options.beam_size > 0 else 0,
            redirect_whispercpp_logs_to=None,
            **self._params(self.options),
        )

    @staticmethod
    def _params(opts: EngineOptions) -> dict[str, Any]:
        params: dict[str, Any] = {
            "n_threads": opts.threads,
            "language": opts.language,
            "print_progress": False,
            "print_realtime": False,
            "print_timestamps": False,
            "no_context": True,
            "token_timestamps": opts.word_timestamps,
        }
        if opts.initial_prompt:
            params["initial_prompt"] = opts.initial_prompt
        if opts.beam_size > 0:
            params["beam_search"] = {"beam_size": opts.beam_size, "patience": -1.0}
        return params

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        should_abort: Callable[[], bool] | None = None,
        on_progress: Callable[[float], None] | None = None,
    ) -> Transcript:
        """Transcribe float32 16 kHz mono samples.

        Args:
            audio: 1-D float32 samples in [-1, 1] at 16 kHz.
            should_abort: polled by whisper.cpp between decode steps; True stops early.
            on_progress: called (on the transcribing thread) with the audio seconds done so far.

        Raises:
            EngineError: the input has the wrong shape or type, or whisper.cpp failed.
        """
        if audio.ndim != 1 or audio.dtype != np.float32:
            raise EngineError(f"engine needs 1-D float32 audio, got {audio.dtype} {audio.shape}")
        audio = np.ascontiguousarray(audio)
        audio_s = audio.size / SAMPLE_RATE
        started = time.perf_counter()
        try:
            raw = self._model.transcribe(
                audio,
                abort_callback=should_abort,
                new_segment_callback=(lambda seg: on_progress(seg.t1 * _TICK_S))
                if on_progress
                else None,
            )
        except Exception as exc:  # the binding raises bare RuntimeErrors
            raise EngineError(f"whisper.cpp failed: {exc}") from exc
        compute_s = time.perf_counter() - started
        segments = tuple(
            Segment(
                start_s=round(s.t0 * _TICK_S, 2),
                end_s=round(min(s.t1 * _TICK_S, audio_s), 2),
                text=s.text.strip(),
                words=self._words(i) if self.options.word_timestamps else (),
            )
            for i, s in enumerate(raw)
        )
        return Transcript(
            segments=tuple(s for s in segments if s.text),
            language=self.options.language,
            audio_s=audio_s,
            compute_s=compute_s,
        )

    def _words(self, segment: int) -> tuple[Word, ...]:
        # Tokens that start with a space begin a new word; special tokens ([_BEG_], <|...|>) are skipped.
        import _pywhispercpp as pw

        ctx = self._model._ctx  # type: ignore[attr-defined]  # the binding exposes no accessor
        eot = pw.whisper_token_eot(ctx)
        words: list[list[Any]] = []
        for j in range(pw.whisper_full_n_tokens(ctx, segment)):
            data = pw.whisper_full_get_token_data(ctx, segment, j)
            if data.id >= eot:
                continue
            piece = pw.whisper_full_get_token_text(ctx, segment, j)
            text = piece.decode("utf-8", "replace") if isinstance(piece, bytes) else str(piece)
            if not words or text.startswith(" "):
                words.append([data.t0 * _TICK_S, data.t1 * _TICK_S, text.strip(), [data.p]])
            else:
                words[-1][1] = data.t1 * _TICK_S
                words[-1][2] += text
                words[-1][3].append(data.p)
        return tuple(
            Word(round(w[0], 2), round(w[1], 2), w[2], float(np.mean(w[3]))) for w in words if w[2]
        )
