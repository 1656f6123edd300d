"""The OpenAI Realtime API's transcription events, pure (no I/O): a client event parsed, a
session update applied to the connection's settings, appended audio decoded to PCM s16le, and
the server events built. The door that speaks them is ``realtime.py``.

Both shapes of a session update are read: the beta one (``transcription_session.update``, or
``session.update`` with flat fields: ``input_audio_format``, ``input_audio_transcription``,
``turn_detection``) and the GA one (``session.update`` with ``session.audio.input``: ``format``
``{"type": "audio/pcm", "rate": 24000}``, ``transcription``, ``turn_detection``). Each is
answered in its own shape.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from katydid import wire_json
from katydid.gateway.http_wire import DEFAULT_MODEL_ALIASES

# The beta names of the formats, and what each is on the wire: (the GA type, its sample rate).
FORMATS = {"pcm16": ("audio/pcm", 24_000), "g711_ulaw": ("audio/pcmu", 8000), "g711_alaw": ("audio/pcma", 8000)}  # fmt: skip
_GA_FORMATS = {ga: beta for beta, (ga, _) in FORMATS.items()}
TURN_TYPES = ("server_vad", "semantic_vad")


class WireError(Exception):
    """A client event the door cannot take: answered with an ``error`` event, the session goes
    on."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class Settings:
    """What the client asked of its transcription (beta names)."""

    audio_format: str = "pcm16"
    sample_rate: int = 24_000
    model: str = "whisper-1"
    language: str | None = None  # None: detected
    prompt: str | None = None
    turn_detection: dict[str, Any] | None = dataclasses.field(
        default_factory=lambda: {"type": "server_vad"}
    )

    def start_fields(self) -> dict[str, Any]:
        """The session core's ``start`` for this (``Session.start_with``)."""
        start: dict[str, Any] = {
            "type": "start",
            "format": "pcm_s16le",
            "sample_rate": self.sample_rate,
            "partials": True,
            "language": self.language or "auto",
        }
        if self.model not in DEFAULT_MODEL_ALIASES:
            start["model"] = self.model
        if self.prompt:
            start["prompt"] = self.prompt
        return start

    def fixed(self) -> tuple[Any, ...]:
        """What a turn keeps from its first audio on (``turn_detection`` may change)."""
        return (self.audio_format, self.sample_rate, self.model, self.language, self.prompt)

    def transcription(self) -> dict[str, Any]:
        return {"model": self.model, "language": self.language, "prompt": self.prompt or ""}

    def turn(self, pause_ms: int) -> dict[str, Any] | None:
        """``turn_detection`` as served: the gateway's own pause ends an utterance."""
        if self.turn_detection is None:
            return None
        return {
            "type": self.turn_detection.get("type", "server_vad"),
            "threshold": 0.5,
            "prefix_padding_ms": 0,
            "silence_duration_ms": pause_ms,
        }

    def beta_session(self, session_id: str, pause_ms: int) -> dict[str, Any]:
        return {
            "id": session_id,
            "object": "realtime.transcription_session",
            "input_audio_format": self.audio_format,
            "input_audio_transcription": self.transcription(),
            "turn_detection": self.turn(pause_ms),
            "input_audio_noise_reduction": None,
            "include": [],
            "modalities": ["text"],
        }

    def ga_session(self, session_id: str, pause_ms: int) -> dict[str, Any]:
        fmt: dict[str, Any] = {"type": FORMATS[self.audio_format][0]}
        if self.audio_format == "pcm16":
            fmt["rate"] = self.sample_rate
        audio_in = {
            "format": fmt,
            "transcription": self.transcription(),
            "turn_detection": self.turn(pause_ms),
            "noise_reduction": None,
        }
        return {
            "type": "transcription",
            "id": session_id,
            "object": "realtime.transcription_session",
            "audio": {"input": audio_in},
            "include": [],
        }


def parse(text: str) -> dict[str, Any]:
    """A client event: a JSON object with a string ``type``.

    Raises:
        WireError: not JSON, not an object, or no type.
    """
    try:
        event = wire_json.loads(text)
    except ValueError:
        raise WireError("invalid_json", "the event is not valid JSON") from None
    if not isinstance(event, dict):
        raise WireError("invalid_event", "an event is a JSON object")
    if not isinstance(event.get("type"), str):
        raise WireError("invalid_event", "the event has no 'type'", "type")
    return event


def _dict(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WireError("invalid_value", f"{param} must be an object", param)
    return value


def _text(value: Any, param: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise WireError("invalid_value", f"{param} must be a string", param)
    return value or None


def update(settings: Settings, event: dict[str, Any]) -> tuple[Settings, bool]:
    """``settings`` with a ``session.update`` / ``transcription_session.update`` applied, and
    whether it was in the GA shape (answered in it).

    Raises:
        WireError: a field the door cannot honour (nothing of the update is applied).
    """
    session = _dict(event.get("session", {}), "session")
    ga = "audio" in session or session.get("type") == "transcription"
    if session.get("type") not in (None, "transcription"):
        raise WireError(
            "invalid_value", "this server does transcription sessions only", "session.type"
        )
    changes: dict[str, Any] = {}
    if ga:
        audio_in = _dict(_dict(session.get("audio", {}), "session.audio").get("input", {}), "session.audio.input")  # fmt: skip
        fmt = audio_in.get("format")
        transcription = audio_in.get("transcription")
        turn_param = "session.audio.input.turn_detection"
        has_turn, turn = "turn_detection" in audio_in, audio_in.get("turn_detection")
        if fmt is not None:
            changes |= _ga_format(_dict(fmt, "session.audio.input.format"))
        where = "session.audio.input.transcription"
    else:
        fmt = session.get("input_audio_format")
        transcription = session.get("input_audio_transcription")
        turn_param = "session.turn_detection"
        has_turn, turn = "turn_detection" in session, session.get("turn_detection")
        if fmt is not None:
            if fmt not in FORMATS:
                raise WireError(
                    "unsupported_audio_format",
                    f"input_audio_format {fmt!r} is not supported; use one of {', '.join(FORMATS)}",
                    "session.input_audio_format",
                )
            changes |= {"audio_format": fmt, "sample_rate": FORMATS[fmt][1]}
        where = "session.input_audio_transcription"
    if transcription is not None:
        t = _dict(transcription, where)
        if "model" in t:
            changes["model"] = _text(t["model"], f"{where}.model") or "whisper-1"
        if "language" in t:
            changes["language"] = _text(t["language"], f"{where}.language")
        if "prompt" in t:
            changes["prompt"] = _text(t["prompt"], f"{where}.prompt")
    if has_turn:
        if turn is not None:
            kind = _dict(turn, turn_param).get("type", "server_vad")
            if kind not in TURN_TYPES:
                raise WireError(
                    "invalid_value", f"turn_detection.type must be one of {TURN_TYPES}", turn_param
                )
            turn = {"type": kind}
        changes["turn_detection"] = turn
    return dataclasses.replace(settings, **changes), ga


def _ga_format(fmt: dict[str, Any]) -> dict[str, Any]:
    kind = fmt.get("type")
    if kind not in _GA_FORMATS:
        raise WireError(
            "unsupported_audio_format",
            f"audio format {kind!r} is not supported; use one of {', '.join(_GA_FORMATS)}",
            "session.audio.input.format.type",
        )
    beta = _GA_FORMATS[kind]
    rate = fmt.get("rate", FORMATS[beta][1]) if beta == "pcm16" else FORMATS[beta][1]
    if not isinstance(rate, int) or isinstance(rate, bool):
        raise WireError("invalid_value", "rate must be a whole number of Hz", "session.audio.input.format.rate")  # fmt: skip
    return {"audio_format": beta, "sample_rate": rate}


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 7, u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype("<i2")


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent, mantissa = (a >> 4) & 7, a & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype("<i2")


_G711 = {"g711_ulaw": _ulaw_table(), "g711_alaw": _alaw_table()}


def audio(event: dict[str, Any], audio_format: str) -> bytes:
    """An ``input_audio_buffer.append``'s audio as PCM s16le (G.711 expanded).

    Raises:
        WireError: ``audio`` is missing or not base64.
    """
    encoded = event.get("audio")
    if not isinstance(encoded, str):
        raise WireError("invalid_value", "audio must be a base64 string", "audio")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise WireError("invalid_value", "audio is not valid base64", "audio") from None
    table = _G711.get(audio_format)
    return raw if table is None else table[np.frombuffer(raw, dtype=np.uint8)].tobytes()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def error(
    code: str,
    message: str,
    param: str | None = None,
    event_id: str | None = None,
    kind: str = "invalid_request_error",
    **more: Any,
) -> dict[str, Any]:
    """An ``error`` event in the API's shape."""
    detail = {"type": kind, "code": code, "message": message, "param": param}
    return {"type": "error", "error": detail | {"event_id": event_id} | more}


def delta(said: str, text: str) -> str:
    """What a transcript adds to what its item's deltas already said ("" if it revises it:
    deltas cannot take words back; ``completed`` carries the whole transcript)."""
    text = text.strip()
    if not said:
        return text
    return text[len(said) :] if text.startswith(said) else ""
