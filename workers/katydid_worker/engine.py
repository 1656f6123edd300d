"""The speech recogniser: a ggml Whisper model loaded once, transcribing 16 kHz mono float32.

An ``Engine`` is the decode loop over its whisper.cpp contexts (whisper_contexts.py): the speech
gate, a clip-sized window checked by the guardrails (the full window when they fail), and a second
decode of speech the first left without text (coverage.py).

Rule 1: an Engine is used by one thread at a time (whisper.cpp's context is not re-entrant);
pywhispercpp releases the GIL inside ``whisper_full``, so other threads and the event loop run
while it transcribes. A worker holds one Engine and calls it from one thread.

Rule 2: the engine never prints, never downloads (whisper_contexts.py keeps it).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from katydid.audio import SAMPLE_RATE
from katydid.errors import EngineError
from katydid.languages import WHISPER_LANGUAGES
from katydid_worker import calibration
from katydid_worker.coverage import (
    MIN_HOLE_VOICED_S,
    MIN_TAIL_VOICED_S,
    next_hole,
    sparse,
    uncovered,
    voiced_in,
)
from katydid_worker.engine_options import DecodeOptions, EngineOptions
from katydid_worker.guardrails import (
    FULL_CTX,
    POSITIONS_PER_S,
    attempt_budget_s,
    check_output,
    choose_audio_ctx,
    strip_markers,
    voiced_seconds,
)
from katydid_worker.pieces import cut_at_pauses
from katydid_worker.speech import Span, SpeechDetector, overlap_s
from katydid_worker.transcript import Segment, Transcript
from katydid_worker.whisper_contexts import TICK_S, WhisperContexts

# A stretch still without text is reported when it holds this much speech (coverage.py).
MIN_REPORTED_UNCOVERED_S = MIN_HOLE_VOICED_S


@dataclass(frozen=True, slots=True)
class _Window:
    """One decode's outcome: its segments in the clip's time, its context size, and why its
    clip-sized attempt was discarded (if it was)."""

    segments: tuple[Segment, ...]
    ctx: int
    fallback: str | None


def _merge(
    kept: list[Segment], new: tuple[Segment, ...], hole: Span, spans: list[Span]
) -> tuple[list[Segment], float]:
    """``kept`` with a second decode's segments for ``hole``, and how far the new text reaches.

    A new segment whose middle lies within a kept one is the same speech decoded twice and is
    left out; a kept segment too sparse for its speech (coverage.sparse) that the hole overlaps
    gives way to the new text when the new text is longer.
    """
    weak = [
        s for s in kept if s.end_s > hole.start_s and s.start_s < hole.end_s and sparse(s, spans)
    ]
    if weak and sum(len(s.text) for s in new) > sum(len(s.text) for s in weak):
        kept = [s for s in kept if s not in weak]
    fresh = [
        s for s in new if not any(k.start_s <= (s.start_s + s.end_s) / 2 <= k.end_s for k in kept)
    ]
    reached = max((s.end_s for s in fresh), default=hole.start_s)
    return sorted(kept + fresh, key=lambda s: s.start_s), reached


class Engine(WhisperContexts):
    """One loaded whisper.cpp model.

    Args:
        model_path: a prepared ggml file (see ``katydid model prepare``).
        options: decoding options applied to every call unless overridden.

    Raises:
        ModelError: the file does not exist (names the command that prepares it).
    """

    def __init__(self, model_path: Path, options: EngineOptions | None = None) -> None:
        super().__init__(model_path, options)
        self.fallbacks = 0
        self.redecodes = 0  # runs over uncovered speech, since the engine was made
        self._speech = SpeechDetector() if self.options.speech_gate else None
        # The full-window cost of a near-empty clip (the encoder's fixed cost), which bounds what
        # a clip-sized attempt may spend before we give up on it (see guardrails.py). Measured
        # and budgeted in CPU seconds of this process, not wall time: a busy machine must not
        # turn good clip-sized runs into fallbacks (and make results depend on the load).
        self.full_window_s = 0.0
        self.budgets_s: dict[int, float] = {}  # a clip-sized attempt's CPU budget, per size
        # Where they came from: "measured" here, "cached" (this host measured them before for
        # this model and options: calibration.py), or "none" (no clip-sized context).
        self.calibration = "none"
        if self.options.clip_context:
            self._calibrate()

    def _calibrate(self) -> None:
        """Near-empty runs at the full window and at every clip size set each size's budget
        (``attempt_budget_s``). Every size is measured, not interpolated: the encoder's cost is
        linear in the size on an AMD EPYC (0.169-0.294 CPU s for 384-640 positions), but some
        sizes hit slow kernels at 2-3x their neighbours' cost (guardrails.py), and which ones
        depends on the CPU. What this host measured before for this model and these options is
        read back instead (calibration.py: the key names everything the values depend on)."""
        silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
        steps = sorted(self.options.clip_ctx_steps)
        # The clip context's first run, at its largest size, sets up its buffers here rather
        # than inside the first job's budget (with a cached calibration too).
        self._run(silence, audio_ctx=steps[-1], temperature_inc=0.0, abort=None)
        key: dict[str, Any] | None = None
        if self.options.calibration_cache:
            try:
                key = calibration.calibration_key(self.model_path, self.options)
            except OSError:
                pass  # the model file cannot be read again: measure, keep nothing
            else:
                cached = calibration.load(calibration.cache_file(self.model_path, key), key)
                if cached is not None:
                    self.full_window_s = cached.full_window_s
                    self.budgets_s = dict(cached.budgets_s)
                    self.calibration = "cached"
                    return
        # Medians of three, interleaved: one noisy measurement would set the budgets for good,
        # of this worker and of every later one that reads them back (this machine's speed
        # varies by 10-30% from one minute to the next).
        samples: dict[int, list[float]] = {ctx: [] for ctx in (FULL_CTX, *steps)}
        for _ in range(3):
            for ctx, runs in samples.items():
                started = time.process_time()
                self._run(silence, audio_ctx=ctx, temperature_inc=0.0, abort=None)
                runs.append(time.process_time() - started)
        self.full_window_s = statistics.median(samples[FULL_CTX])
        for step in steps:
            self.budgets_s[step] = attempt_budget_s(
                self.full_window_s, statistics.median(samples[step]), self.options.budget_ratio
            )
        self.calibration = "measured"
        if key is not None:
            measured = calibration.Calibration(self.full_window_s, self.budgets_s)
            calibration.save(calibration.cache_file(self.model_path, key), key, measured)

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        decode: DecodeOptions | None = None,
        should_abort: Callable[[], bool] | None = None,
        on_progress: Callable[[float], None] | None = None,
    ) -> Transcript:
        """Transcribe float32 16 kHz mono samples.

        Args:
            audio: 1-D float32 samples in [-1, 1] at 16 kHz.
            decode: this call's language, prompt, word timestamps and task (default: the
                engine options').
            should_abort: polled by whisper.cpp between decode steps; True stops early.
            on_progress: called (on the transcribing thread) with the audio seconds done so far.

        Raises:
            EngineError: the input has the wrong shape or type, or whisper.cpp failed.
        """
        if audio.ndim != 1 or audio.dtype != np.float32:
            raise EngineError(f"engine needs 1-D float32 audio, got {audio.dtype} {audio.shape}")
        started = time.perf_counter()
        audio = np.ascontiguousarray(audio)
        audio_s = audio.size / SAMPLE_RATE
        opts = self.options
        decode = decode or self.default_decode
        if decode.language != "auto" and decode.language not in WHISPER_LANGUAGES:
            # The binding would quietly turn an unknown code into "detect".
            raise EngineError(f"unknown language {decode.language!r}")
        spans: list[Span] | None = None
        trim_s = 0.0
        if self._speech is not None:
            spans = self._speech.spans(audio)
            if not spans:
                # Nobody spoke: no text, and no decoding to pay for.
                language = "en" if decode.language == "auto" else decode.language
                return Transcript((), language, audio_s, time.perf_counter() - started, 0)
            pad = opts.speech_pad_s
            first = max(0, int((spans[0].start_s - pad) * SAMPLE_RATE))
            last = min(audio.size, math.ceil((spans[-1].end_s + pad) * SAMPLE_RATE))
            trim_s = first / SAMPLE_RATE
            audio = audio[first:last]
        if decode.language == "auto":
            # English-only: nothing to detect. Otherwise detected up front, in a context of its
            # own (see _detect).
            language = self._detect(audio) if self.multilingual else "en"
            decode = dataclasses.replace(decode, language=language)
        if (decode.translate or decode.language != "en") and not self.multilingual:
            # whisper.cpp would quietly decode English: say so instead (the gateway refuses
            # such a session at start; this guards every other caller).
            raise EngineError(
                f"language {decode.language!r}"
                + (" and translation need" if decode.translate else " needs")
                + " a multilingual model"
            )
        self._decode = decode
        if spans is None:  # no speech detector: one window, as whisper.cpp decodes it
            window = self._window(audio, trim_s, audio_s, None, should_abort, on_progress)
            return self._transcript(window, audio_s, started)
        return self._covered(audio, trim_s, audio_s, spans, should_abort, on_progress, started)

    def _covered(
        self,
        audio: np.ndarray,
        trim_s: float,
        audio_s: float,
        spans: list[Span],
        should_abort: Callable[[], bool] | None,
        on_progress: Callable[[float], None] | None,
        started: float,
    ) -> Transcript:
        """Decode the speech, then decode again each stretch of it that no segment covers
        (coverage.py: whisper ends a window's text early and the rest is never decoded), until
        every stretch is covered or has been tried once; what still has no text is reported
        (``Transcript.uncovered``), never passed off as silence."""
        window = self._pieces(audio, trim_s, audio_s, spans, should_abort, on_progress)
        min_tail_s = math.inf if self._decode.preview else MIN_TAIL_VOICED_S
        segments = list(window.segments)
        reasons = [window.fallback] if window.fallback else []
        tried: list[Span] = []
        redecodes = 0
        end_s = trim_s + audio.size / SAMPLE_RATE
        while redecodes < self.options.max_redecodes:
            if should_abort is not None and should_abort():
                break
            hole = next_hole(spans, segments, tried, min_tail_s=min_tail_s)
            if hole is None:
                break
            redecodes += 1
            # From the end of the speech before it (or a margin) to the start of the speech
            # after it: the decode sees the whole stretch and nothing a kept segment holds.
            pad = self.options.speech_pad_s
            a = max(trim_s, hole.start_s - pad)
            b = min(end_s, hole.end_s + pad)
            part = audio[int((a - trim_s) * SAMPLE_RATE) : math.ceil((b - trim_s) * SAMPLE_RATE)]
            got = self._window(part, a, audio_s, spans, should_abort, on_progress)
            segments, reached = _merge(segments, got.segments, hole, spans)
            # Text well into the stretch: the rest of it (where the new run may have stopped
            # early too) is the next hole. None: this stretch has had its second chance.
            tried.append(Span(a, reached if reached >= hole.start_s + MIN_HOLE_VOICED_S else b))
            if reasons[-1:] != ["uncovered"]:
                reasons.append("uncovered")
        # Reported: what still has no text and is more than a word or two (short stretches
        # after the text get their second decode, but a breath there is not news).
        holes = tuple(
            (round(h.start_s, 2), round(h.end_s, 2))
            for h in uncovered(spans, segments, min_tail_s=min_tail_s)
            if voiced_in(h.start_s, h.end_s, spans) >= MIN_REPORTED_UNCOVERED_S
        )
        self.redecodes += redecodes
        return self._transcript(
            _Window(tuple(segments), window.ctx, "+".join(reasons) or None),
            audio_s,
            started,
            redecodes=redecodes,
            uncovered=holes,
        )

    def _pieces(
        self,
        audio: np.ndarray,
        trim_s: float,
        audio_s: float,
        spans: list[Span],
        should_abort: Callable[[], bool] | None,
        on_progress: Callable[[float], None] | None,
    ) -> _Window:
        """The speech decoded in clip-sized pieces cut in its pauses when it is too long for
        one clip-sized window (pieces.py), else in one window."""
        opts = self.options
        end_s = trim_s + audio.size / SAMPLE_RATE
        longest_s = max(opts.clip_ctx_steps) / POSITIONS_PER_S - opts.ctx_margin_s
        cut = opts.pieces if self._decode.pieces is None else self._decode.pieces
        if not (opts.clip_context and cut) or end_s - trim_s <= longest_s:
            return self._window(audio, trim_s, audio_s, spans, should_abort, on_progress)
        max_s = min(longest_s, opts.piece_max_s)
        windows: list[_Window] = []
        for a, b in cut_at_pauses(spans, trim_s, end_s, max_s=max_s, min_s=opts.piece_min_s):
            if windows and should_abort is not None and should_abort():
                break
            part = audio[int((a - trim_s) * SAMPLE_RATE) : math.ceil((b - trim_s) * SAMPLE_RATE)]
            windows.append(self._window(part, a, audio_s, spans, should_abort, on_progress))
        reasons = dict.fromkeys(w.fallback for w in windows if w.fallback)
        return _Window(
            tuple(s for w in windows for s in w.segments),
            max(w.ctx for w in windows),
            "+".join(reasons) or None,
        )

    def _window(
        self,
        audio: np.ndarray,
        at_s: float,
        audio_s: float,
        spans: list[Span] | None,
        should_abort: Callable[[], bool] | None,
        on_progress: Callable[[float], None] | None,
    ) -> _Window:
        """One decode of ``audio`` (which starts ``at_s`` into the clip): clip-sized with
        guardrails when it fits, else (or when they fail) the full window."""
        opts = self.options
        progress = (lambda seg: on_progress(at_s + seg.t1 * TICK_S)) if on_progress else None
        fallback: str | None = None
        speech_s = audio.size / SAMPLE_RATE  # what is decoded: the speech and its margins
        ctx = (
            choose_audio_ctx(speech_s, margin_s=opts.ctx_margin_s, steps=opts.clip_ctx_steps)
            if opts.clip_context
            else FULL_CTX
        )
        if ctx < FULL_CTX:
            # A loop shows as a decode that runs on: the budget stops it (whisper.cpp reports
            # segments only at the end of a window, so text cannot be watched while it grows).
            deadline = time.process_time() + self.budgets_s[ctx]

            def over_budget() -> bool:
                return time.process_time() > deadline or bool(should_abort and should_abort())

            # No temperature retries here: a bad clip-sized decode goes to the full window.
            raw = self._run(
                audio, audio_ctx=ctx, temperature_inc=0.0, abort=over_budget, progress=progress
            )
            segments = self._segments(raw, ctx, at_s, audio_s, spans)
            if should_abort is not None and should_abort():
                return _Window(segments, ctx, None)
            if time.process_time() > deadline:
                fallback = "budget"
            else:
                text = " ".join(s.text for s in raw)
                local = [Span(s.start_s - at_s, s.end_s - at_s) for s in spans] if spans else None
                voiced_s = (
                    sum(max(0.0, min(s.end_s, speech_s) - max(s.start_s, 0.0)) for s in local)
                    if local
                    else voiced_seconds(audio)
                )
                fallback = check_output(text, speech_s, voiced_s)
            if fallback is None:
                return _Window(segments, ctx, None)
            self.fallbacks += 1
        tinc = 0.2 if opts.temperature_fallback else 0.0
        raw = self._run(
            audio, audio_ctx=FULL_CTX, temperature_inc=tinc, abort=should_abort, progress=progress
        )
        return _Window(self._segments(raw, FULL_CTX, at_s, audio_s, spans), FULL_CTX, fallback)

    def _segments(
        self,
        raw: list[Any],
        audio_ctx: int,
        at_s: float,
        audio_s: float,
        spans: list[Span] | None,
    ) -> tuple[Segment, ...]:
        """A run's segments in the clip's time (``at_s``: where the decoded audio began),
        without non-speech markers, and without segments that lie outside every span of speech
        (text that nobody said: a hallucination over a pause). Read right after the run: word
        times come from the context, which the next run overwrites."""
        segments = []
        for i, s in enumerate(raw):
            start_s = round(at_s + s.t0 * TICK_S, 2)
            end_s = round(max(start_s, min(at_s + s.t1 * TICK_S, audio_s)), 2)
            text = strip_markers(s.text.strip())
            if not text:
                continue
            # Whisper's segment times are rough (a few hundred ms): a segment is kept when it
            # touches speech widened by 0.1 s by at least 0.1 s (or all of it, if shorter).
            if spans is not None and overlap_s(start_s, end_s, spans, 0.1) < min(
                0.1, (end_s - start_s) / 2
            ):
                continue
            words = (
                self._words(audio_ctx, i, at_s, start_s, end_s)
                if self._decode.word_timestamps
                else ()
            )
            segments.append(Segment(start_s, end_s, text, words))
        return tuple(segments)

    def _transcript(
        self,
        window: _Window,
        audio_s: float,
        started: float,
        *,
        redecodes: int = 0,
        uncovered: tuple[tuple[float, float], ...] = (),
    ) -> Transcript:
        return Transcript(
            segments=window.segments,
            language=self._decode.language,
            audio_s=audio_s,
            compute_s=time.perf_counter() - started,
            audio_ctx=window.ctx,
            fallback=window.fallback,
            redecodes=redecodes,
            uncovered=uncovered,
        )
