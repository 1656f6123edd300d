"""The speech recogniser: a ggml Whisper model loaded once, transcribing 16 kHz mono float32.

Rule 1: an Engine is used by one thread at a time (whisper.cpp's context is not re-entrant);
pywhispercpp releases the GIL inside ``whisper_full``, so other threads and the event loop run
while it transcribes. A worker holds one Engine and calls it from one thread.

Rule 2: the engine never prints, never downloads. pywhispercpp's ``Model(name)`` downloads when the
argument is not an existing file, so the path is checked here first.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from katydid.errors import EngineError, ModelError
from katydid.languages import WHISPER_LANGUAGES
from katydid.messages import SAMPLE_RATE
from katydid_worker.coverage import MIN_HOLE_VOICED_S, next_hole, sparse, uncovered, voiced_in
from katydid_worker.ggml_check import check_ggml
from katydid_worker.guardrails import (
    CLIP_CTX_STEPS,
    FULL_CTX,
    attempt_budget_s,
    check_output,
    choose_audio_ctx,
    strip_markers,
    voiced_seconds,
)
from katydid_worker.speech import Span, SpeechDetector, overlap_s

_TICK_S = 0.01  # whisper.cpp reports times in 10 ms ticks
_HOP = 160  # samples per mel frame; an encoder position covers two frames (20 ms)
DETECT_CTX = 384  # encoder positions language detection looks at: the first 7.68 s


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
    audio_ctx: int = 1500  # encoder positions used by the run that produced it (1500 = 30 s)
    # Why the first run's text was not kept as it came: "budget", a guardrail's reason (the
    # clip-sized run was discarded for a full-window one), "uncovered" (speech no segment
    # covered was decoded again), joined by "+".
    fallback: str | None = None
    redecodes: int = 0  # runs over speech the first run left without text
    # Stretches of speech (start_s, end_s in the clip) that still have no text after their
    # second decode: said, never silently dropped.
    uncovered: tuple[tuple[float, float], ...] = ()

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.text).strip()

    @property
    def rtf(self) -> float:
        """Real-time factor: compute seconds per audio second (lower is faster)."""
        return self.compute_s / self.audio_s if self.audio_s > 0 else math.nan


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """Decoding options. Defaults were measured on the shared clips for accuracy per CPU second
    (see docs/engine.md): greedy, clip-sized context with guardrails, whisper.cpp's thresholds.
    """

    language: str = "en"
    threads: int = 1
    beam_size: int = 0  # 0 = greedy
    word_timestamps: bool = False
    initial_prompt: str | None = None
    clip_context: bool = True  # encoder window sized to the clip, with guardrails
    ctx_margin_s: float = 1.0  # context beyond the clip's length
    # The context sizes a clip may get (a clip takes the smallest that holds it plus the
    # margin); guardrails.py has the measurements. Longer clips use the full window: past 640
    # positions a clip-sized run's encoder leaves too little of its budget for the text.
    clip_ctx_steps: tuple[int, ...] = CLIP_CTX_STEPS
    # A clip-sized attempt's CPU budget: this much of the clip's own full-window time
    # (guardrails.attempt_budget_s), so that attempt plus fallback stay within 1.5x of it.
    budget_ratio: float = 0.5
    temperature_fallback: bool = True  # whisper.cpp's temperature retries, in full-window runs
    entropy_thold: float = 2.4
    logprob_thold: float = -1.0
    no_speech_thold: float = 0.6
    # Voice activity (speech.py): no speech, no text; the clip is trimmed to its speech plus
    # speech_pad_s before decoding; segments outside every span of speech are dropped.
    speech_gate: bool = True
    speech_pad_s: float = 0.3
    # Speech the first run left without text is decoded again, at most this many runs per
    # call (coverage.py); 0 = never (what every chunk got before: passages went missing).
    max_redecodes: int = 8


@dataclass(frozen=True, slots=True)
class DecodeOptions:
    """What one call asks for, applied without reloading the model: a job's options.

    ``language`` is a Whisper language code or ``"auto"`` (detect; multilingual models);
    ``translate`` turns the speech into English text (multilingual models).
    """

    language: str = "en"
    prompt: str | None = None
    word_timestamps: bool = False
    translate: bool = False


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


def _drop_log(*_args: object) -> None:
    return None


def build_info() -> str:
    """whisper.cpp's own account of how it was compiled (SIMD levels, LLAMAFILE, OPENMP...),
    after the compiler that built ggml's CPU kernels."""
    import _pywhispercpp as pw

    return f"COMPILER = {build_compiler()} | {str(pw.whisper_print_system_info()).strip()}"


_COMPILER_MARK = re.compile(rb"(clang version [0-9][0-9.]*|GCC: \([^)]*\) [0-9][0-9.]*)")


def build_compiler() -> str:
    """The compiler of ggml's CPU library, read from its ELF comment section ('clang 16.0.6',
    'gcc 12.2.0'), or 'unknown'. It matters: clang 16 ran the full-window encoder ~17% faster
    than GCC 12 on an AMD EPYC (docs/engine.md, "Engine build")."""
    import _pywhispercpp as pw

    libs = sorted(Path(pw.__file__).parent.glob("libggml-cpu*.so*"))
    if not libs:
        return "unknown"
    try:
        marks: set[bytes] = set(_COMPILER_MARK.findall(libs[0].read_bytes()))
    except OSError:
        return "unknown"
    # C runtime start files carry the system GCC's mark even in a clang build.
    for mark in sorted(marks, key=lambda m: not m.startswith(b"clang")):
        text = str(mark.decode("ascii", "replace"))
        if text.startswith("clang"):
            return "clang " + text.removeprefix("clang version ")
        return "gcc " + text.rsplit(" ", 1)[-1]
    return "unknown"


def has_fast_kernels(info: str) -> bool:
    """True when whisper.cpp has llamafile's matrix kernels: without them (PyPI's portable wheel)
    the engine measured ~1.4x slower on the shared clips; docs/engine.md has the fix."""
    return "LLAMAFILE = 1" in info


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
        check_ggml(model_path)  # whisper.cpp segfaults, silently, on a file that is not one
        import _pywhispercpp as pw
        from pywhispercpp.model import Model  # imported late: it loads a native library

        # whisper.cpp logs to stderr from C (e.g. "failed to decode" when we abort a run on
        # purpose); the engine never prints, so its log goes nowhere.
        pw.whisper_log_set(_drop_log)
        # ...but not during interpreter shutdown, when a model freed late would call back into
        # a finalizing interpreter (a fatal error): the default logger is back by then.
        atexit.register(pw.whisper_log_set, None)

        self.options = options or EngineOptions()
        self.model_path = model_path
        # Two whisper.cpp contexts: the full window with flash attention, every clip-sized
        # window in one context without it. Why:
        # - Speed: flash attention is faster at 1,500 positions (encoder 807 ms against 1,098)
        #   and slower at clip sizes (384: 137 against 109 ms; 16 short clips 7% faster).
        # - Results must not depend on what the worker transcribed before. With flash attention
        #   the decoder attends, unmasked, to GGML_PAD(audio_ctx, 256) cross-attention positions,
        #   laid out per layer at that padded stride, of which this run's encoder wrote
        #   audio_ctx; the rest hold what an earlier run at another size left (measured: 384
        #   after a full window turned "dog suit" into "ducks suit"). The full window only ever
        #   runs at one size. Without flash attention the decoder reads exactly audio_ctx
        #   positions, so clip sizes can share a context: every short clip transcribed the same
        #   from a fresh context and from one shared with all other sizes, in any order.
        self._models: dict[bool, Any] = {}
        self._model_class = Model
        self.default_decode = DecodeOptions(
            language=self.options.language,
            prompt=self.options.initial_prompt,
            word_timestamps=self.options.word_timestamps,
        )
        self._decode = self.default_decode
        self._detector: Any = None  # the language-detection context, made on first use
        # Both contexts load now: a bad model fails here, not at the first job, and no job pays
        # for a model load (nor does a benchmark's timed window).
        self._model_for(FULL_CTX)
        if self.options.clip_context:
            self._model_for(min(self.options.clip_ctx_steps))
        self.multilingual = bool(pw.whisper_is_multilingual(self._model_for(FULL_CTX)._ctx))
        if not self.multilingual and self.default_decode.language not in ("en", "auto"):
            raise ModelError(
                f"language {self.options.language!r} needs a multilingual model; {model_path.name}"
                " is English-only"
            )
        self.fallbacks = 0
        self.redecodes = 0  # runs over uncovered speech, since the engine was made
        self._speech = SpeechDetector() if self.options.speech_gate else None
        # The full-window cost of a near-empty clip (the encoder's fixed cost), which bounds what
        # a clip-sized attempt may spend before we give up on it (see guardrails.py). Measured
        # and budgeted in CPU seconds of this process, not wall time: a busy machine must not
        # turn good clip-sized runs into fallbacks (and make results depend on the load).
        self.full_window_s = 0.0
        self.budgets_s: dict[int, float] = {}  # a clip-sized attempt's CPU budget, per size
        if self.options.clip_context:
            self._calibrate()

    def _calibrate(self) -> None:
        """Near-empty runs at the full window and at every clip size set each size's budget
        (``attempt_budget_s``). Every size is measured, not interpolated: the encoder's cost is
        linear in the size on an AMD EPYC (0.169-0.294 CPU s for 384-640 positions), but some
        sizes hit slow kernels at 2-3x their neighbours' cost (guardrails.py), and which ones
        depends on the CPU."""
        silence = np.zeros(SAMPLE_RATE, dtype=np.float32)
        steps = sorted(self.options.clip_ctx_steps)
        # The clip context's first run, at its largest size, sets up its buffers here rather
        # than inside the first job's budget.
        self._run(silence, audio_ctx=steps[-1], temperature_inc=0.0, abort=None)
        # Medians of three, interleaved: one noisy measurement would set this worker's budget
        # for good (this machine's speed varies by 10-30% from one minute to the next).
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

    @staticmethod
    def _params(opts: EngineOptions) -> dict[str, Any]:
        params: dict[str, Any] = {
            "n_threads": opts.threads,
            "print_progress": False,
            "print_realtime": False,
            "print_timestamps": False,
            "no_context": True,
            # Tokens that only open non-speech markers ("[", "(", "♪"...) are never decoded.
            "suppress_nst": True,
            "entropy_thold": opts.entropy_thold,
            "logprob_thold": opts.logprob_thold,
            "no_speech_thold": opts.no_speech_thold,
        }
        if opts.beam_size > 0:
            params["beam_search"] = {"beam_size": opts.beam_size, "patience": -1.0}
        return params

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
        window = self._window(audio, trim_s, audio_s, spans, should_abort, on_progress)
        segments = list(window.segments)
        reasons = [window.fallback] if window.fallback else []
        tried: list[Span] = []
        redecodes = 0
        end_s = trim_s + audio.size / SAMPLE_RATE
        while redecodes < self.options.max_redecodes:
            if should_abort is not None and should_abort():
                break
            hole = next_hole(spans, segments, tried)
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
        holes = tuple(
            (round(h.start_s, 2), round(h.end_s, 2))
            for h in uncovered(spans, segments)
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
        progress = (lambda seg: on_progress(at_s + seg.t1 * _TICK_S)) if on_progress else None
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

    def _model_for(self, audio_ctx: int) -> Any:
        full = audio_ctx >= FULL_CTX
        model = self._models.get(full)
        if model is None:
            model = self._models[full] = self._model_class(
                str(self.model_path),
                params_sampling_strategy=1 if self.options.beam_size > 0 else 0,
                redirect_whispercpp_logs_to=None,
                context_params={"flash_attn": full},
                **self._params(self.options),
            )
        return model

    def _run(
        self,
        audio: np.ndarray,
        *,
        audio_ctx: int,
        temperature_inc: float,
        abort: Callable[[], bool] | None,
        progress: Callable[[Any], None] | None = None,
    ) -> list[Any]:
        try:
            raw: list[Any] = self._model_for(audio_ctx).transcribe(
                audio,
                abort_callback=abort,
                new_segment_callback=progress,
                audio_ctx=0 if audio_ctx >= FULL_CTX else audio_ctx,
                temperature_inc=temperature_inc,
                # Every call sets all of them: the binding keeps a call's params for the next.
                language=self._decode.language,
                detect_language=False,
                translate=self._decode.translate,
                initial_prompt=self._decode.prompt or "",
                token_timestamps=self._decode.word_timestamps,
            )
        except Exception as exc:  # the binding raises bare RuntimeErrors
            raise EngineError(f"whisper.cpp failed: {exc}") from exc
        return raw

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
            start_s = round(at_s + s.t0 * _TICK_S, 2)
            end_s = round(max(start_s, min(at_s + s.t1 * _TICK_S, audio_s)), 2)
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

    def _detect(self, audio: np.ndarray) -> str:
        """The spoken language: a multilingual model's guess from the first DETECT_CTX positions
        (7.7 s) of the audio.

        whisper.cpp's own "auto" detects before it applies the run's ``audio_ctx``, i.e. at the
        size of the context's previous run: in the shared clip context the detected language
        would depend on the previous job, and in the full-window one it costs a whole 30 s
        encoder pass (base on an AMD EPYC with AVX2: 2.7 CPU s, twice its 1.2 s transcription of
        a short clip). So a third context, made on first use, runs one warm-up at DETECT_CTX and
        then detection only (which returns before it would change the size): always the same
        size, at about a quarter of the full window's cost.

        Raises:
            EngineError: whisper.cpp could not tell.
        """
        import _pywhispercpp as pw

        if self._detector is None:
            self._detector = self._model_class(
                str(self.model_path),
                params_sampling_strategy=0,
                redirect_whispercpp_logs_to=None,
                context_params={"flash_attn": False},
                **self._params(self.options),
            )
            warm_up = np.zeros(SAMPLE_RATE, dtype=np.float32)
            self._detector.transcribe(warm_up, language="en", audio_ctx=DETECT_CTX)
        try:
            self._detector.transcribe(
                audio[: DETECT_CTX * 2 * _HOP],
                language="auto",
                detect_language=True,  # whisper.cpp stops after detection
                audio_ctx=DETECT_CTX,
            )
        except Exception as exc:  # the binding raises bare RuntimeErrors
            raise EngineError(f"whisper.cpp language detection failed: {exc}") from exc
        lang_id = int(pw.whisper_full_lang_id(self._detector._ctx))  # no accessor in the binding
        language = str(pw.whisper_lang_str(lang_id)) if lang_id >= 0 else ""
        # whisper.cpp's table ends with large-v3's "yue", whose token id is the translate
        # token's in every other model: a detection can land there, but it is not a language.
        if language not in WHISPER_LANGUAGES:
            raise EngineError(f"whisper.cpp could not detect the language (got {language!r})")
        return language

    def _words(
        self, audio_ctx: int, segment: int, trim_s: float, seg_start: float, seg_end: float
    ) -> tuple[Word, ...]:
        # Tokens that start with a space begin a new word; special tokens ([_BEG_], <|...|>) are
        # skipped. whisper.cpp's token times can overlap or fall outside their segment: each word
        # is clamped into the segment and to start where the previous one ended, so times are
        # monotonic.
        import _pywhispercpp as pw

        ctx = self._model_for(audio_ctx)._ctx  # the binding exposes no accessor
        eot = pw.whisper_token_eot(ctx)
        words: list[list[Any]] = []
        for j in range(pw.whisper_full_n_tokens(ctx, segment)):
            data = pw.whisper_full_get_token_data(ctx, segment, j)
            if data.id >= eot:
                continue
            piece = pw.whisper_full_get_token_text(ctx, segment, j)
            text = piece.decode("utf-8", "replace") if isinstance(piece, bytes) else str(piece)
            if not words or text.startswith(" "):
                words.append(
                    [trim_s + data.t0 * _TICK_S, trim_s + data.t1 * _TICK_S, text.strip(), [data.p]]
                )
            else:
                words[-1][1] = trim_s + data.t1 * _TICK_S
                words[-1][2] += text
                words[-1][3].append(data.p)
        out: list[Word] = []
        floor = seg_start
        for t0, t1, text, probs in words:
            text = strip_markers(text)
            if not text:
                continue
            start = min(max(t0, floor), seg_end)
            end = min(max(t1, start), seg_end)
            out.append(Word(round(start, 2), round(end, 2), text, float(np.mean(probs))))
            floor = end
        return tuple(out)
