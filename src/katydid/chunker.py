"""Utterance chunker: 16 kHz mono s16 in, chunks of at most ``max_s`` out, cut at pauses.

Voice activity on 30 ms frames. A frame is silent when its RMS is below a threshold derived from
the loudest recent frames (26 dB down) and the quietest (3× the noise floor), or, with ``vad``,
when WebRTC's voice activity detector (a GMM over sub-band energies, C, ~5 µs per frame) hears no
speech in it: a steady noise or hum then ends an utterance as silence does.

Files (and the default): a chunk is cut in the middle of the first pause of at least
``silence_s`` once it is ``min_s`` long. Live audio (``eager``): a chunk is cut as soon as a pause
has lasted ``silence_s`` after ``min_s`` of audio (the speaker paused: the final should not wait
for them to speak again), ``_TAIL`` into the pause; silence before speech is not kept beyond
``_LEAD`` (it would only make jobs of nothing). If no pause comes by ``max_s``, a chunk is cut at
the quietest frame of its last third, so a word is split only where the speaker left no pause.

Rule 1: per-frame cost is constant. RMS is computed once per new 30 ms frame and kept; a feed
of 100 ms of audio does not rescan the buffer in Python.
Rule 2: memory is bounded by ``max_s`` of audio.
Rule 3: samples are int16 from the gateway's edge to the job's body: cut, never converted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from katydid.audio import SAMPLE_RATE

FRAME = 480  # 30 ms
_PEAK_DECAY = 0.999  # per frame: the loudness reference forgets over ~30 s
_LEAD = 10  # frames (0.3 s) of silence kept before speech in eager mode
_TAIL = 7  # frames (0.21 s) of a pause kept at the end of an eagerly cut chunk
_VAD_MODE = 3  # WebRTC's most aggressive: least likely to call noise speech


@dataclass(frozen=True, slots=True)
class Chunk:
    seq: int
    offset_s: float  # start within the session
    audio: np.ndarray  # int16, 16 kHz mono

    @property
    def duration_s(self) -> float:
        return self.audio.size / SAMPLE_RATE


class Chunker:
    """Cut a stream into utterance chunks.

    Args:
        min_s: earliest cut at a pause.
        max_s: hard maximum chunk length (≤ 30 s, Whisper's window).
        silence_s: pause length that counts as a cut point.
    """

    def __init__(
        self,
        *,
        min_s: float = 3.0,
        max_s: float = 30.0,
        silence_s: float = 0.3,
        eager: bool = False,
        vad: bool = False,
        soft_max_s: float = 0.0,
        soft_pause_s: float = 0.2,
        longest_pause: bool = False,
    ) -> None:
        self._eager = eager
        # Files: wait until max_s of audio is held, then cut in the longest pause past min_s
        # (a speaker's turn or a sentence's end more often than the first pause is).
        self._longest = longest_pause and not eager
        # Eager (live) only: from soft_max_s of audio on, a shorter pause (soft_pause_s) ends
        # the utterance too; 0 = off.
        self._soft_frames = int(soft_max_s * SAMPLE_RATE) // FRAME if soft_max_s > 0 else 0
        self._soft_pause_frames = max(1, round(soft_pause_s * SAMPLE_RATE / FRAME))
        self._use_vad = vad
        self._vad: Any = None  # made with the first audio: a session that sends none costs none
        self._min_frames = max(1, int(min_s * SAMPLE_RATE) // FRAME)
        self._max = (int(max_s * SAMPLE_RATE) // FRAME) * FRAME
        self._silence_frames = max(1, round(silence_s * SAMPLE_RATE / FRAME))
        # Grown by doubling up to max_s, released at flush: a session waiting in the queue for
        # its results holds no audio (500 waiting sessions once held 1 GB of empty buffers).
        # The per-frame arrays grow with it (a session that has sent nothing holds none).
        self._buf = np.zeros(0, dtype=np.int16)
        self._n = 0  # samples held
        self._rms = np.zeros(1)  # per complete frame held
        # Per frame held: did the VAD hear speech (all True without one).
        self._speech = np.ones(1, dtype=bool)
        self._offset = 0  # samples already emitted
        self._seq = 0
        self._floor = np.inf
        self._peak = 0.0

    @property
    def chunks_emitted(self) -> int:
        return self._seq

    def resume_at(self, seq: int, samples: int) -> None:
        """A resumed session's audio goes on from here: its next chunk is ``seq`` and starts
        ``samples`` into the session (what earlier connections already cut into jobs)."""
        self._seq = seq
        self._offset = samples

    @property
    def buffered_samples(self) -> int:
        return self._n

    @property
    def buffered_s(self) -> float:
        return self._n / SAMPLE_RATE

    def has_speech(self) -> bool:
        """The chunk in progress has a voiced frame (a partial of it could have text)."""
        frames = self._n // FRAME
        return bool(self._voiced(frames).any())

    def pending_audio(self) -> np.ndarray:
        """A copy of the audio of the chunk in progress (for a partial result)."""
        return self._buf[: self._n].copy()

    def feed(self, audio: np.ndarray) -> list[Chunk]:
        """Add int16 samples; return the chunks that are now complete."""
        out: list[Chunk] = []
        pos = 0
        while pos < audio.size:
            take = min(self._max - self._n, audio.size - pos)
            self._reserve(self._n + take)
            before = self._n // FRAME
            self._buf[self._n : self._n + take] = audio[pos : pos + take]
            self._n += take
            pos += take
            self._measure(before, self._n // FRAME)
            out.extend(self._cut())
        return out

    def flush(self) -> list[Chunk]:
        """End of stream: return what remains, skipping trailing pure silence."""
        out = self._cut()
        if self._n:
            frames = self._n // FRAME
            voiced = frames and bool(self._loud(frames).any())
            tail = self._buf[frames * FRAME : self._n]
            loud_tail = tail.size and int(np.abs(tail.astype(np.int32)).max()) > 32  # > 1e-3
            if voiced or (loud_tail and frames == 0):
                out.append(self._emit(self._n))
            else:
                self._offset += self._n
                self._n = 0
        self._buf = np.zeros(0, dtype=np.int16)
        self._rms = np.zeros(1)
        self._speech = np.ones(1, dtype=bool)
        return out

    def _reserve(self, size: int) -> None:
        if size > self._buf.size:
            grown = np.zeros(
                min(self._max, max(size, 2 * self._buf.size, 8 * FRAME)), dtype=np.int16
            )
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
            frames = self._n // FRAME
            rms = np.zeros(grown.size // FRAME + 1)
            rms[:frames] = self._rms[:frames]
            speech = np.ones(grown.size // FRAME + 1, dtype=bool)
            speech[:frames] = self._speech[:frames]
            self._rms, self._speech = rms, speech

    def _measure(self, start: int, end: int) -> None:
        if end <= start:
            return
        frames = self._buf[start * FRAME : end * FRAME].reshape(end - start, FRAME)
        # On the [-1, 1) scale, as the thresholds are written.
        power = np.mean(np.square(frames, dtype=np.float64), axis=1) / 32768.0**2
        rms = np.sqrt(power + 1e-12)
        self._rms[start:end] = rms
        self._floor = min(self._floor, float(rms.min()))
        self._peak = max(self._peak * _PEAK_DECAY ** (end - start), float(rms.max()))
        if self._use_vad:
            if self._vad is None:
                import webrtcvad

                self._vad = webrtcvad.Vad(_VAD_MODE)
            is_speech = self._vad.is_speech
            for i, frame in enumerate(frames, start):
                self._speech[i] = is_speech(frame.tobytes(), SAMPLE_RATE)

    def _loud(self, frames: int) -> np.ndarray:
        """Frames above the energy threshold: what may be speech. Only silence by this measure
        is ever dropped (the engine's own detector has the last word on what is speech)."""
        return self._rms[:frames] > self._threshold()

    def _voiced(self, frames: int) -> np.ndarray:
        """Frames that are speech: loud, and heard as speech by the VAD (if any)."""
        return self._loud(frames) & self._speech[:frames]

    def _threshold(self) -> float:
        # 3x the floor, but never above 10 dB under the peak: audio with no pause at all (a
        # steady noise or tone) would otherwise make its own level the floor and look silent.
        return max(self._peak * 0.05, min(self._floor * 3.0, self._peak * 0.3), 3e-4)

    def _cut(self) -> list[Chunk]:
        out: list[Chunk] = []
        if self._eager:
            self._drop_lead()
        while self._n // FRAME >= self._min_frames:
            frames = self._n // FRAME
            rms = self._rms[:frames]
            if self._longest:
                if self._n < self._max:
                    break
                cut = self._longest_cut(~self._voiced(frames))
            else:
                cut = self._pause_cut(~self._voiced(frames))
            if cut is None:
                if self._n < self._max:
                    break
                start = (2 * frames) // 3
                cut = (start + int(np.argmin(rms[start:]))) * FRAME
                cut = cut or self._max
            out.append(self._emit(cut))
        return out

    def _longest_cut(self, silent: np.ndarray) -> int | None:
        """The middle of the longest pause (of at least ``silence_s``, the latest of equals)
        whose middle lies past min_s and which ends before the audio held does."""
        padded = np.concatenate(([False], silent, [False]))
        edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
        best: tuple[int, int] | None = None  # (length, middle)
        for s, e in zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True):
            middle = (s + e) // 2
            if e - s < self._silence_frames or middle < self._min_frames or e == silent.size:
                continue
            if best is None or e - s >= best[0]:
                best = (e - s, middle)
        return best[1] * FRAME if best else None

    def _pause_cut(self, silent: np.ndarray) -> int | None:
        """Where to cut at the first long-enough pause: in its middle once it ends after min_s
        (files), or ``_TAIL`` into it once it starts after min_s (eager: live)."""
        padded = np.concatenate(([False], silent, [False]))
        edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
        starts, ends = edges[0::2], edges[1::2]  # runs of silence: [start, end)
        for s, e in zip(starts, ends, strict=True):
            if e - s < self._silence_frames:
                continue
            if self._eager:
                if s >= self._min_frames:
                    return int(min(e, s + _TAIL)) * FRAME
                continue
            if e < self._min_frames:
                continue
            if e == silent.size:
                return None  # the pause may go on: wait for more audio
            return int((s + e) // 2) * FRAME
        if self._eager and self._soft_frames and silent.size >= self._soft_frames:
            # A speaker who never pauses for long: the latest short pause ends the utterance,
            # so that it stays within the engine's clip-sized windows (whisper.cpp's full 30 s
            # window costs ~4x the encoder of a 12 s one, AMD EPYC) and its final comes.
            soft = [
                int(min(e, s + _TAIL)) * FRAME
                for s, e in zip(starts, ends, strict=True)
                if e - s >= self._soft_pause_frames and s >= self._min_frames
            ]
            if soft:
                return soft[-1]
        return None

    def _drop_lead(self) -> None:
        """Eager mode: forget silence before the first loud frame beyond ``_LEAD`` frames."""
        frames = self._n // FRAME
        voiced = np.flatnonzero(self._loud(frames))
        first = int(voiced[0]) if voiced.size else frames
        drop = first - _LEAD
        if drop > 0:
            self._forget(drop * FRAME)

    def _emit(self, n: int) -> Chunk:
        chunk = Chunk(self._seq, self._offset / SAMPLE_RATE, self._buf[:n].copy())
        self._forget(n)
        self._seq += 1
        return chunk

    def _forget(self, n: int) -> None:
        """Drop the first ``n`` samples held (a multiple of FRAME, or all of them)."""
        rest = self._n - n
        self._buf[:rest] = self._buf[n : self._n]
        frames_dropped = n // FRAME
        kept = self._n // FRAME - frames_dropped
        self._rms[:kept] = self._rms[frames_dropped : frames_dropped + kept]
        self._speech[:kept] = self._speech[frames_dropped : frames_dropped + kept]
        self._n = rest
        self._offset += n
