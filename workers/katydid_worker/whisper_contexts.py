"""One model's whisper.cpp contexts and every call into the binding: load, run one decode, detect
the language, read a segment's words. The decode loop built on them is engine.py's ``Engine``.

engine.py's Rule 2 is kept here: the engine never prints, never downloads. pywhispercpp's
``Model(name)`` downloads when the argument is not an existing file, so the path is checked here
first; whisper.cpp's own log goes nowhere. Its Rule 1 holds too: one thread at a time.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from katydid.audio import SAMPLE_RATE
from katydid.errors import EngineError, ModelError
from katydid.languages import WHISPER_LANGUAGES
from katydid_worker.engine_options import DecodeOptions, EngineOptions
from katydid_worker.ggml_check import check_ggml
from katydid_worker.guardrails import FULL_CTX, strip_markers
from katydid_worker.transcript import Word

TICK_S = 0.01  # whisper.cpp reports times in 10 ms ticks
_HOP = 160  # samples per mel frame; an encoder position covers two frames (20 ms)
DETECT_CTX = 384  # encoder positions language detection looks at: the first 7.68 s


def _drop_log(*_args: object) -> None:
    return None


class WhisperContexts:
    """One model file's whisper.cpp contexts, loaded once, and the calls that run them.

    Args:
        model_path: a prepared ggml file (see ``katydid model prepare``).
        options: decoding options applied to every call unless overridden.

    Raises:
        ModelError: the file does not exist (names the command that prepares it), or the
            options' language needs a multilingual model and this one is English-only.
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
                    [trim_s + data.t0 * TICK_S, trim_s + data.t1 * TICK_S, text.strip(), [data.p]]
                )
            else:
                words[-1][1] = trim_s + data.t1 * TICK_S
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
