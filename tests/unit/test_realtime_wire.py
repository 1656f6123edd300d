"""The OpenAI Realtime door's pure part (``realtime_wire.py``): client events parsed, session
updates in both shapes applied, audio decoded, and the server events it builds validated by the
`openai` SDK's own models (when the SDK is installed)."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest

from katydid.gateway import realtime_wire as wire


def _ga(audio_in: dict[str, Any]) -> dict[str, Any]:
    return {"type": "session.update", "session": {"type": "transcription", "audio": {"input": audio_in}}}  # fmt: skip


@pytest.mark.parametrize(
    ("text", "code"),
    [("{not json", "invalid_json"), ("[1]", "invalid_event"), ('{"type": 3}', "invalid_event")],
)
def test_a_malformed_event_is_a_wire_error(text: str, code: str) -> None:
    with pytest.raises(wire.WireError) as refused:
        wire.parse(text)
    assert refused.value.code == code


def test_the_beta_update_sets_format_model_language_prompt_and_turns() -> None:
    event = {
        "type": "transcription_session.update",
        "session": {
            "input_audio_format": "g711_ulaw",
            "input_audio_transcription": {"model": "base", "language": "de", "prompt": "Köln"},
            "turn_detection": None,
        },
    }
    settings, ga = wire.update(wire.Settings(), event)
    assert not ga
    assert settings.audio_format == "g711_ulaw"
    assert settings.sample_rate == 8000
    assert settings.turn_detection is None
    assert settings.start_fields() == {
        "type": "start",
        "format": "pcm_s16le",
        "sample_rate": 8000,
        "partials": True,
        "language": "de",
        "model": "base",
        "prompt": "Köln",
    }


def test_the_ga_update_and_the_defaults() -> None:
    settings = wire.Settings()
    start = settings.start_fields()
    assert start["sample_rate"] == 24_000  # pcm16: 24 kHz, resampled by the core
    assert start["language"] == "auto"
    assert "model" not in start  # whisper-1: the server's default model
    audio_in = {
        "format": {"type": "audio/pcm", "rate": 16_000},
        "transcription": {"model": "gpt-4o-mini-transcribe", "language": "en"},
        "turn_detection": {"type": "semantic_vad", "eagerness": "low"},
    }
    settings, ga = wire.update(settings, _ga(audio_in))
    assert ga
    assert (settings.audio_format, settings.sample_rate, settings.language) == ("pcm16", 16_000, "en")  # fmt: skip
    assert "model" not in settings.start_fields()
    assert settings.turn(500) == {
        "type": "semantic_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 0,
        "silence_duration_ms": 500,
    }
    settings, _ = wire.update(settings, _ga({"format": {"type": "audio/pcma"}}))
    assert (settings.audio_format, settings.sample_rate) == ("g711_alaw", 8000)


@pytest.mark.parametrize(
    ("event", "code", "param"),
    [
        ({"type": "transcription_session.update", "session": {"input_audio_format": "opus"}}, "unsupported_audio_format", "session.input_audio_format"),
        (_ga({"format": {"type": "audio/opus"}}), "unsupported_audio_format", "session.audio.input.format.type"),
        ({"type": "session.update", "session": {"type": "realtime"}}, "invalid_value", "session.type"),
        ({"type": "session.update", "session": {"turn_detection": {"type": "push"}}}, "invalid_value", "session.turn_detection"),
        ({"type": "session.update", "session": "x"}, "invalid_value", "session"),
        ({"type": "session.update", "session": {"input_audio_transcription": {"language": 3}}}, "invalid_value", "session.input_audio_transcription.language"),
    ],
)  # fmt: skip
def test_an_update_the_door_cannot_honour_names_the_field(
    event: dict[str, Any], code: str, param: str
) -> None:
    with pytest.raises(wire.WireError) as refused:
        wire.update(wire.Settings(), event)
    assert (refused.value.code, refused.value.param) == (code, param)
    if code == "unsupported_audio_format":
        assert "opus" in refused.value.message


def test_appended_audio_decodes_pcm_and_g711() -> None:
    pcm = np.array([0, 1000, -1000], dtype="<i2").tobytes()
    append = {"audio": base64.b64encode(pcm).decode()}
    assert wire.audio(append, "pcm16") == pcm
    # G.711's well-known points: silence, and the largest magnitudes.
    ulaw = wire.audio({"audio": base64.b64encode(bytes([0xFF, 0x7F, 0x00, 0x80])).decode()}, "g711_ulaw")  # fmt: skip
    assert np.frombuffer(ulaw, "<i2").tolist() == [0, 0, -32124, 32124]
    alaw = wire.audio({"audio": base64.b64encode(bytes([0xD5, 0x55, 0x2A, 0xAA])).decode()}, "g711_alaw")  # fmt: skip
    assert np.frombuffer(alaw, "<i2").tolist() == [8, -8, -32256, 32256]
    for bad in ({"audio": "@@not base64@@"}, {"audio": 3}, {}):
        with pytest.raises(wire.WireError) as refused:
            wire.audio(bad, "pcm16")
        assert refused.value.param == "audio"


def test_deltas_add_what_is_new_and_never_take_words_back() -> None:
    assert wire.delta("", " and so ") == "and so"
    assert wire.delta("and so", "and so my fellow") == " my fellow"
    assert wire.delta("and so", "and sew") == ""  # a revision: completed carries it
    assert wire.delta("and so", "and so") == ""


def test_the_events_are_what_the_sdk_reads() -> None:
    pytest.importorskip("openai")
    from openai.types.beta.realtime.error_event import ErrorEvent as BetaError
    from openai.types.beta.realtime.transcription_session_updated_event import (
        TranscriptionSessionUpdatedEvent,
    )
    from openai.types.realtime.realtime_error_event import RealtimeErrorEvent
    from openai.types.realtime.session_updated_event import SessionUpdatedEvent

    settings = wire.Settings(language="en", prompt="Kennedy")
    beta: dict[str, Any] = {"type": "transcription_session.updated", "event_id": "e1"}
    # The beta model requires the ephemeral key a REST session creation returns; the door has
    # none to give (the SDK reads events without validating them).
    secret = {"client_secret": {"value": "", "expires_at": 0}}
    beta["session"] = settings.beta_session("sess_1", 500) | secret
    parsed = TranscriptionSessionUpdatedEvent.model_validate(beta)
    assert parsed.session.input_audio_format == "pcm16"
    ga = {"type": "session.updated", "event_id": "e2", "session": settings.ga_session("sess_1", 500)}  # fmt: skip
    assert SessionUpdatedEvent.model_validate(ga).session.type == "transcription"
    error = wire.error("invalid_value", "audio is not valid base64", "audio", "evt_9")
    for model in (BetaError, RealtimeErrorEvent):
        checked = model.model_validate({"event_id": "e3"} | error)
        assert checked.error.param == "audio"
        assert checked.error.event_id == "evt_9"
