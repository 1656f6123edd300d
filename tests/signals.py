"""Synthetic audio for fast tests: what a voice activity detector hears as speech, and not."""

from __future__ import annotations

import numpy as np

SR = 16_000


def vowel(seconds: float, amplitude: float = 0.2) -> np.ndarray:
    """A sung vowel: a pulse train at 100-140 Hz (30 harmonics), 4 Hz syllable rhythm. WebRTC's
    VAD hears it as speech (a pure sine it does not), so the gateway's live cuts treat it as a
    voice; float32 in [-1, 1]."""
    t = np.arange(int(seconds * SR)) / SR
    phase = np.cumsum(120 + 20 * np.sin(2 * np.pi * 3 * t)) / SR
    saw = sum(np.sin(2 * np.pi * h * phase) / h for h in range(1, 30))
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
    out = amplitude * saw * envelope / max(1e-9, float(np.max(np.abs(saw))))
    return np.asarray(out, dtype=np.float32)


def vowel_pcm(seconds: float, amplitude: float = 0.2) -> np.ndarray:
    """``vowel`` as int16 samples."""
    out: np.ndarray = np.rint(vowel(seconds, amplitude) * 32767).astype(np.int16)
    return out
