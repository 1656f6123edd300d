"""The OpenAI Realtime door (``/v1/realtime?intent=transcription``), spoken by the `openai`
SDK's own realtime client against real processes (nats-server, gateway, workers, the real model)
with an API keys file: jfk as 24 kHz pcm16 in 100 ms appends, deltas then completed items
(checked by WER against the clip's reference), a wrong key refused, malformed events answered
with an `error` while the session goes on."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import soxr
import trio
from websockets.exceptions import ConnectionClosed

from katydid.audio import decode_container, float_to_pcm16
from katydid.evaluation import Clip, read_manifest, wer
from tests.integration.stack import Stack, http_get, wait_until

pytestmark = pytest.mark.integration

RATE = 24_000
APPEND = RATE // 10 * 2  # bytes: 100 ms of pcm16


@pytest.fixture(scope="module")
def key_and_stack(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path
) -> Iterator[tuple[str, Stack]]:
    root = tmp_path_factory.mktemp("realtime")
    keys_file = root / "api-keys"
    out = subprocess.run(
        [sys.executable, "-m", "katydid", "keys", "add", "rt", "--keys-file", keys_file],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    key = out.strip().splitlines()[-1]
    with Stack(root, model_dir, workers=2, api_keys_file=keys_file) as s:
        wait_until(lambda: http_get(s.metrics_url + "/readyz")[0] == 200, 30, "ready")
        yield key, s


@pytest.fixture(scope="module")
def jfk_pcm(speech_dir: Path) -> tuple[Clip, bytes]:
    clip = next(c for c in read_manifest(speech_dir / "manifest.tsv") if c.name == "jfk.wav")
    audio = decode_container(clip.path, max_audio_s=60, max_bytes=10**8)
    return clip, float_to_pcm16(soxr.resample(audio, 16_000, RATE).astype(np.float32))


def _connect(stack: Stack, key: str, **query: str) -> Any:
    client = openai.OpenAI(base_url=stack.metrics_url + "/v1", api_key=key, max_retries=0)
    return client.realtime.connect(
        model="gpt-4o-transcribe", extra_query={"intent": "transcription", **query}
    )


def _event(conn: Any) -> dict[str, Any]:
    """The next server event, parsed by the SDK, as a dict (the SDK's recv has no timeout:
    pytest-timeout bounds a test)."""
    event = conn.recv()
    return dict(event.model_dump(exclude_unset=True))


def _append(conn: Any, pcm: bytes, pace_s: float = 0.0) -> None:
    for i in range(0, len(pcm), APPEND):
        conn.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + APPEND]).decode()})  # fmt: skip
        if pace_s:
            time.sleep(pace_s)


def _transcribe(conn: Any, pcm: bytes, pace_s: float) -> list[dict[str, Any]]:
    """Stream ``pcm``, commit, and read until every committed item is answered (a no-op
    update after the commit: its answer comes after the commit's own events)."""
    _append(conn, pcm, pace_s)
    conn.send({"type": "input_audio_buffer.commit"})
    conn.send({"type": "transcription_session.update", "session": {}})
    events: list[dict[str, Any]] = []
    after_commit = False
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        event = _event(conn)
        events.append(event)
        after_commit = after_commit or event["type"] == "transcription_session.updated"
        committed = {e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"}
        answered = {
            e["item_id"]
            for e in events
            if e["type"].startswith("conversation.item.input_audio_transcription.")
            and e["type"].rsplit(".", 1)[1] in ("completed", "failed")
        }
        if after_commit and committed and committed <= answered:
            return events
    raise AssertionError(f"not every item answered: {events}")


def _session(conn: Any) -> None:
    """The created events, then a GA update (24 kHz pcm, English), answered."""
    first = [_event(conn)["type"], _event(conn)["type"]]
    assert first == ["transcription_session.created", "session.created"]
    audio_in = {
        "format": {"type": "audio/pcm", "rate": RATE},
        "transcription": {"model": "whisper-1", "language": "en"},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": 500},
    }
    conn.send({"type": "session.update", "session": {"type": "transcription", "audio": {"input": audio_in}}})  # fmt: skip
    updated = _event(conn)
    assert updated["type"] == "session.updated", updated
    assert updated["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": RATE}


def test_jfk_streamed_gets_deltas_then_completed_items(
    key_and_stack: tuple[str, Stack], jfk_pcm: tuple[Clip, bytes]
) -> None:
    key, stack = key_and_stack
    clip, pcm = jfk_pcm
    with _connect(stack, key) as conn:
        _session(conn)
        events = _transcribe(conn, pcm, pace_s=0.05)  # 2x real time
    kinds = [e["type"] for e in events]
    assert "error" not in kinds, events
    completed = [e for e in events if e["type"].endswith("transcription.completed")]
    text = " ".join(e["transcript"] for e in completed if e["transcript"])
    measured = wer(clip.reference, text)
    print(f"realtime WER {measured:.3f}: {text}")
    assert measured <= 0.1, text
    for done in completed:
        item = done["item_id"]
        mine = [e for e in events if e.get("item_id") == item]
        assert mine[0]["type"] == "input_audio_buffer.committed"
        assert mine[-1] is done
        if done["transcript"]:
            deltas = [e["delta"] for e in mine if e["type"].endswith("transcription.delta")]
            assert deltas, mine
    assert any(e["type"].endswith("transcription.delta") for e in events)
    # Items go in the order spoken, and are answered in that order.
    committed = [e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed"]
    assert [e["item_id"] for e in completed] == committed


def test_a_wrong_key_is_refused(key_and_stack: tuple[str, Stack]) -> None:
    _key, stack = key_and_stack
    with _connect(stack, "kd_not-a-key") as conn:
        event = _event(conn)
        assert event["type"] == "error", event
        assert event["error"]["code"] == "unauthorized"
        with pytest.raises(ConnectionClosed) as closed:
            _event(conn)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4401


def test_another_intent_is_answered_with_an_error_and_a_close(
    key_and_stack: tuple[str, Stack],
) -> None:
    key, stack = key_and_stack
    with _connect(stack, key, intent="conversation") as conn:
        event = _event(conn)
        assert event["type"] == "error", event
        assert event["error"]["code"] == "invalid_intent"
        with pytest.raises(ConnectionClosed):
            _event(conn)


def test_malformed_events_get_errors_and_the_session_goes_on(
    key_and_stack: tuple[str, Stack], jfk_pcm: tuple[Clip, bytes]
) -> None:
    key, stack = key_and_stack
    clip, pcm = jfk_pcm
    with _connect(stack, key) as conn:
        _session(conn)
        _append(conn, pcm[: len(pcm) // 2])
        conn.send_raw("{not json")
        conn.send({"type": "response.create", "event_id": "evt_1"})
        conn.send({"type": "input_audio_buffer.append", "audio": "@@not base64@@"})
        conn.send({"type": "transcription_session.update", "session": {"input_audio_format": "opus"}})  # fmt: skip
        # A turn's language is its own: changed while it takes audio, refused (it goes on).
        german = {"input_audio_transcription": {"model": "whisper-1", "language": "de"}}
        conn.send({"type": "transcription_session.update", "session": german})
        errors: list[dict[str, Any]] = []
        while len(errors) < 5:
            event = _event(conn)
            if event["type"] == "error":
                errors.append(event["error"])
        assert [e["code"] for e in errors] == [
            "invalid_json",
            "unsupported_event",
            "invalid_value",
            "unsupported_audio_format",
            "session_in_progress",
        ], errors
        assert errors[1]["event_id"] == "evt_1"
        assert "opus" in errors[3]["message"]
        events = _transcribe(conn, pcm[len(pcm) // 2 :], pace_s=0.0)
    text = " ".join(e["transcript"] for e in events if e["type"].endswith("completed"))
    measured = wer(clip.reference, text)
    assert measured <= 0.1, text


async def test_a_binary_frame_is_an_error_not_an_end(key_and_stack: tuple[str, Stack]) -> None:
    """Below the SDK: a binary message and an event over the bound (websockets by hand)."""
    from websockets.sync.client import connect

    key, stack = key_and_stack
    url = stack.metrics_url.replace("http", "ws") + "/v1/realtime?intent=transcription"

    def session() -> list[dict[str, Any]]:
        seen = []
        with connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
            seen += [json.loads(ws.recv(timeout=10)), json.loads(ws.recv(timeout=10))]
            ws.send(b"\x00\x01")
            seen.append(json.loads(ws.recv(timeout=10)))
            ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            seen.append(json.loads(ws.recv(timeout=10)))
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 3_000_000}))
            seen.append(json.loads(ws.recv(timeout=10)))
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1009
        return seen

    seen = await trio.to_thread.run_sync(session)
    assert [e["type"] for e in seen] == [
        "transcription_session.created",
        "session.created",
        "error",
        "input_audio_buffer.cleared",
        "error",
    ], seen
    assert seen[-1]["error"]["code"] == "too_large"


def test_the_protocol_docs_example_runs(key_and_stack: tuple[str, Stack], jfk_pcm: tuple[Clip, bytes]) -> None:  # fmt: skip
    """docs/protocol.md's "Realtime (OpenAI)" example, as a reader would paste it."""
    key, stack = key_and_stack
    clip, _pcm = jfk_pcm
    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "protocol.md").read_text(encoding="utf-8")
    section = doc.split("## Realtime (OpenAI)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("http://127.0.0.1:8000/v1", stack.metrics_url + "/v1")
    code = code.replace('api_key="unused"', f"api_key={key!r}")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout.strip().splitlines()[-1]
    assert "..." in done.stdout  # its deltas
    assert wer(clip.reference, text) <= 0.1, done.stdout


def _ulaw(pcm: bytes) -> bytes:
    """G.711 mu-law (ITU-T G.711's encoder, as a telephone line carries it)."""
    x = np.frombuffer(pcm, dtype="<i2").astype(np.int32)
    sign = np.where(x < 0, 0x80, 0)
    magnitude = np.minimum(np.abs(x), 32635) + 0x84
    exponent = np.clip(np.floor(np.log2(magnitude)).astype(np.int32) - 7, 0, 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    encoded: bytes = (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()
    return encoded


def test_the_beta_client_streams_g711_ulaw(
    key_and_stack: tuple[str, Stack], jfk_pcm: tuple[Clip, bytes]
) -> None:
    """The SDK's beta realtime client, a beta-shaped update, and telephone audio (8 kHz
    mu-law, 100 ms an append)."""
    key, stack = key_and_stack
    clip, _pcm = jfk_pcm
    audio = decode_container(clip.path, max_audio_s=60, max_bytes=10**8)
    ulaw = _ulaw(float_to_pcm16(soxr.resample(audio, 16_000, 8000).astype(np.float32)))
    # The beta client takes wss:// from base_url unless told (the GA one follows its scheme).
    client: Any = openai.OpenAI(
        base_url=stack.metrics_url + "/v1",
        websocket_base_url=stack.metrics_url.replace("http", "ws", 1) + "/v1",
        api_key=key,
        max_retries=0,
    )
    connecting = client.beta.realtime.connect(
        model="gpt-4o-transcribe", extra_query={"intent": "transcription"}
    )
    with connecting as conn:
        assert [_event(conn)["type"], _event(conn)["type"]] == [
            "transcription_session.created",
            "session.created",
        ]
        session = {
            "input_audio_format": "g711_ulaw",
            "input_audio_transcription": {"model": "whisper-1", "language": "en"},
            "turn_detection": None,
        }
        conn.send({"type": "transcription_session.update", "session": session})
        updated = _event(conn)
        assert updated["type"] == "transcription_session.updated", updated
        assert updated["session"]["input_audio_format"] == "g711_ulaw"
        assert updated["session"]["turn_detection"] is None
        for i in range(0, len(ulaw), 800):
            conn.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(ulaw[i : i + 800]).decode()})  # fmt: skip
        events = _transcribe(conn, b"", pace_s=0.0)
    text = " ".join(e["transcript"] for e in events if e["type"].endswith("completed"))
    measured = wer(clip.reference, text)
    print(f"realtime g711_ulaw WER {measured:.3f}: {text}")
    assert measured <= 0.1, text


@pytest.mark.parametrize(
    ("session", "audio_bytes", "code", "close"),
    [
        ({"input_audio_transcription": {"model": "no-such-model"}}, 4800, "unsupported_option", 1003),
        ({}, 1024 * 1024 + 2, "too_large", 1009),  # over max_frame_bytes once decoded
    ],
)  # fmt: skip
async def test_a_sessions_coded_error_is_an_error_then_its_close(
    key_and_stack: tuple[str, Stack],
    session: dict[str, Any],
    audio_bytes: int,
    code: str,
    close: int,
) -> None:
    from websockets.sync.client import connect

    key, stack = key_and_stack
    url = stack.metrics_url.replace("http", "ws", 1) + "/v1/realtime?intent=transcription"

    def run() -> tuple[list[dict[str, Any]], int | None]:
        seen = []
        headers = {"Authorization": f"Bearer {key}"}
        with connect(url, additional_headers=headers, max_size=None) as ws:
            ws.send(json.dumps({"type": "transcription_session.update", "session": session}))
            audio = base64.b64encode(bytes(audio_bytes)).decode()
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
            try:
                while True:
                    seen.append(json.loads(ws.recv(timeout=30)))
            except ConnectionClosed as exc:
                return seen, exc.rcvd.code if exc.rcvd else None

    seen, closed = await trio.to_thread.run_sync(run)
    assert seen[-1]["type"] == "error", seen
    assert seen[-1]["error"]["code"] == code
    assert closed == close
