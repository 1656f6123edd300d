"""The engine's options: how a worker's engine decodes (``EngineOptions``, fixed when it loads)
and what one call asks for (``DecodeOptions``, a job's options)."""

from __future__ import annotations

from dataclasses import dataclass

from katydid_worker.guardrails import CLIP_CTX_STEPS


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
    # Speech too long for the largest clip size is decoded in clip-sized pieces cut in its
    # longest pauses (pieces.py), each at least piece_min_s where the pauses allow, instead of
    # one full window: ~1.5x faster on the bench's 12-30 s utterances (AMD EPYC), and a word or
    # two in 200 heard differently (docs/engine.md). Off by default for finals; a call may ask for it
    # (DecodeOptions.pieces: a worker does for partials).
    pieces: bool = False
    piece_min_s: float = 5.0
    # At most this long where the pauses allow (and never past the largest clip size): a
    # text-dense piece near 11.8 s overruns the 640-position budget and is decoded again in the
    # full window (the gateway cuts files at 9.5 s at most for the same reason).
    piece_max_s: float = 9.5
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
    # The calibration (a near-empty clip's full-window cost and the attempt budgets) is read
    # from the model's calibration/ directory when this host measured it before (calibration.py)
    calibration_cache: bool = True


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
    pieces: bool | None = None  # None: the engine's option (EngineOptions.pieces)
    # A partial: its audio ends while the speaker talks, so speech after its text is still
    # being said, not left out (coverage's tail rule is for finals).
    preview: bool = False
