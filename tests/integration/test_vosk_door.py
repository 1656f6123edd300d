"""The vosk-server-compatible door, spoken by a client written from vosk-server's documented
protocol with the `websockets` library (not our client): one answer per message, `eof` answered
with the rest of the transcript, then the server closes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from katydid.audio import decode_container, float_to_pcm16
from katydid.evaluation import Clip, read_manifest, wer
from tests.integration.stack import Stack, stream_messages

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("vosk"), model_dir, workers=2) as s:
        yield s


@pytest.fixture(scope="module")
def jfk(speech_dir: Path) -> Clip:
    return next(c for c in read_manifest(speech_dir / "manifest.tsv") if c.name == "jfk.wav")


def _vosk_session(url: str, pcm: bytes, rate: int, frame: int) -> list[dict[str, Any]]:
    """What vosk-server's websocket/test.py does: config (no answer), then send a frame and read
    one answer, ..., then eof and read the last answer: the final result."""
    answers = []
    with connect(url + "/vosk") as ws:
        ws.send(json.dumps({"config": {"sample_rate": rate}}))  # not answered, as by vosk
        for i in range(0, len(pcm), frame):
            ws.send(pcm[i : i + frame])
            answers.append(json.loads(ws.recv(timeout=30)))
        ws.send('{"eof" : 1}')
        answers.append(json.loads(ws.recv(timeout=120)))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1000
    return answers


@pytest.mark.parametrize("rate", [16_000, 8_000])
async def test_a_vosk_client_gets_its_transcript(stack: Stack, jfk: Clip, rate: int) -> None:
    audio = decode_container(jfk.path, max_audio_s=60, max_bytes=10**8)
    if rate != 16_000:
        import soxr

        audio = soxr.resample(audio, 16_000, rate).astype(np.float32)
    pcm = float_to_pcm16(audio)
    answers = await trio.to_thread.run_sync(_vosk_session, stack.url, pcm, rate, rate // 2)
    assert all(("partial" in a) != ("text" in a) for a in answers), answers
    results = [a for a in answers if "text" in a]
    assert results[-1] is answers[-1]  # eof's answer: the rest of the transcript
    text = " ".join(r["text"] for r in results)
    assert wer(jfk.reference, text) <= 0.1, text
    words = [w for r in results for w in r["result"]]
    assert len(words) >= 15
    assert all(set(w) == {"conf", "start", "end", "word"} for w in words)
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)


def _refusal(ws: Any) -> tuple[dict[str, Any], int]:
    """The error the server answered with, and the close code after it."""
    answer = json.loads(ws.recv(timeout=10))
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    return answer, closed.value.rcvd.code


def _garbage(url: str) -> tuple[dict[str, Any], int]:
    with connect(url + "/vosk") as ws:
        ws.send("{not json")
        return _refusal(ws)


def _rate_changed(url: str, pcm: bytes, audio_first: bool) -> tuple[dict[str, Any], int]:
    """A stream at 16 kHz (its first audio, or a first config) told 8 kHz by a later config."""
    with connect(url + "/vosk") as ws:
        if audio_first:
            ws.send(pcm[:32000])
            ws.recv(timeout=30)
            ws.send(json.dumps({"config": {"sample_rate": 8000}}))
        else:
            ws.send(json.dumps({"config": {"sample_rate": 16000}}))
            ws.send(json.dumps({"config": {"sample_rate": 8000}}))
        return _refusal(ws)


@pytest.mark.parametrize("audio_first", [True, False], ids=["mid_stream", "second_config"])
async def test_a_later_config_that_changes_the_rate_is_refused(
    stack: Stack, jfk: Clip, audio_first: bool
) -> None:
    pcm = float_to_pcm16(decode_container(jfk.path, max_audio_s=60, max_bytes=10**8))
    answer, code = await trio.to_thread.run_sync(_rate_changed, stack.url, pcm, audio_first)
    assert (answer["code"], code) == ("bad_message", 1008)
    assert "16000 Hz" in answer["error"]


async def test_malformed_vosk_json_gets_an_error_and_a_close(stack: Stack) -> None:
    before = await trio.to_thread.run_sync(stream_messages, stack.nats_url)
    answer, code = await trio.to_thread.run_sync(_garbage, stack.url)
    assert answer["code"] == "bad_message"
    assert code == 1008
    assert await trio.to_thread.run_sync(stream_messages, stack.nats_url) == before


def _eof_twice(url: str, pcm: bytes) -> tuple[str, int | None]:
    """The session's whole text (every result's), and the close code."""
    with connect(url + "/vosk") as ws:
        # More than one config, as vosk-server takes them (the rate is the first one's)
        ws.send(json.dumps({"config": {"sample_rate": 16000}}))
        ws.send(json.dumps({"config": {"words": 1}}))
        texts = []
        for i in range(0, len(pcm), 32000):
            ws.send(pcm[i : i + 32000])
            texts.append(json.loads(ws.recv(timeout=30)).get("text", ""))
            if i == 0:  # one mid-stream that changes nothing is let be
                ws.send(json.dumps({"config": {"sample_rate": 16000, "words": 1}}))
        ws.send('{"eof" : 1}')
        ws.send('{"eof" : 1}')  # a client that says it twice, then sends a late frame
        ws.send(pcm[:3200])
        ws.send(json.dumps({"config": {"sample_rate": 16000}}))  # and a config
        while True:
            try:
                texts.append(json.loads(ws.recv(timeout=120)).get("text", ""))
            except ConnectionClosed as closed:
                return " ".join(texts), closed.rcvd.code if closed.rcvd else None


async def test_a_second_eof_a_config_or_late_audio_does_not_cost_the_transcript(
    stack: Stack, jfk: Clip
) -> None:
    pcm = float_to_pcm16(decode_container(jfk.path, max_audio_s=60, max_bytes=10**8))
    text, code = await trio.to_thread.run_sync(_eof_twice, stack.url, pcm)
    assert code == 1000
    assert wer(jfk.reference, text) <= 0.1, text
