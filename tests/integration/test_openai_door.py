"""The OpenAI-compatible HTTP door, tried with the `openai` package itself (not our client) and
with hostile requests written by hand. Transcripts are checked by normalised WER."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import trio
from websockets.sync.client import connect as ws_connect

from katydid.evaluation import Clip, read_manifest, wer
from tests.integration.stack import Stack, http_get, stream_messages, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("openai"), model_dir, workers=2) as s:
        wait_until(lambda: http_get(s.metrics_url + "/readyz")[0] == 200, 30, "ready")
        yield s


@pytest.fixture(scope="module")
def jfk(speech_dir: Path) -> Clip:
    return next(c for c in read_manifest(speech_dir / "manifest.tsv") if c.name == "jfk.wav")


_CLIENTS: list[Any] = []  # closed after each test (an SDK client holds its connections)


def _client(stack: Stack) -> Any:
    """The SDK's client (typed loosely: its overloads are not what these tests are about)."""
    client = openai.OpenAI(base_url=stack.metrics_url + "/v1", api_key="unused", max_retries=0)
    _CLIENTS.append(client)
    return client


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


@pytest.mark.parametrize("fmt", ["json", "text", "srt", "vtt", "verbose_json"])
def test_every_response_format(stack: Stack, jfk: Clip, fmt: str) -> None:
    with jfk.path.open("rb") as f:
        out = _client(stack).audio.transcriptions.create(
            model="whisper-1",
            file=f,
            response_format=fmt,
        )
    if fmt in ("json", "verbose_json"):
        text = out.text
    else:
        assert isinstance(out, str)
        lines = [ln for ln in out.splitlines() if ln and "-->" not in ln]
        text = " ".join(ln for ln in lines if not ln.isdigit() and ln != "WEBVTT")
        if fmt in ("srt", "vtt"):
            assert "-->" in out
        if fmt == "vtt":
            assert out.startswith("WEBVTT\n")
    assert wer(jfk.reference, text) <= 0.05, text


def test_words_and_segments(stack: Stack, jfk: Clip) -> None:
    with jfk.path.open("rb") as f:
        out = _client(stack).audio.transcriptions.create(
            model="whisper-1",
            file=f,
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
        )
    assert out.language == "en"
    assert out.duration == pytest.approx(11.0, abs=0.1)
    assert out.segments
    assert out.words is not None
    assert len(out.words) >= 15
    starts = [w.start for w in out.words]
    assert starts == sorted(starts)
    assert all(0 <= w.start <= w.end <= 11.1 for w in out.words)
    assert wer(jfk.reference, " ".join(w.word for w in out.words)) <= 0.1


def test_streamed_as_server_sent_events(stack: Stack, jfk: Clip) -> None:
    with jfk.path.open("rb") as f:
        events = list(
            _client(stack).audio.transcriptions.create(model="whisper-1", file=f, stream=True)
        )
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done"
    assert kinds.count("transcript.text.done") == 1
    assert "transcript.text.delta" in kinds
    deltas = "".join(e.delta for e in events if e.type == "transcript.text.delta")
    assert deltas == events[-1].text  # joined as they come, the deltas are the final text
    assert wer(jfk.reference, deltas) <= 0.05
    assert wer(jfk.reference, events[-1].text) <= 0.05


# The SDK marks its translations call deprecated; the door still serves it.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_models_and_refusals(stack: Stack, jfk: Clip) -> None:
    client = _client(stack)
    assert [m.id for m in client.models.list()] == ["tiny.en-q8_0"]
    assert client.models.retrieve("tiny.en-q8_0").id == "tiny.en-q8_0"
    # The name the SDK's examples send is the default model, in transcriptions and here alike.
    default = client.models.retrieve("whisper-1")
    assert default.id == "whisper-1"
    assert default.model_dump()["name"] == "tiny.en-q8_0"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("whisper-9")
    with jfk.path.open("rb") as f, pytest.raises(openai.BadRequestError) as refused:
        client.audio.translations.create(model="whisper-1", file=f)  # English-only model
    assert "multilingual" in str(refused.value)
    with jfk.path.open("rb") as f, pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="no-such-model", file=f)
    with pytest.raises(openai.APIStatusError) as garbage:
        client.audio.transcriptions.create(model="whisper-1", file=("x.wav", b"not audio" * 100))
    assert garbage.value.status_code == 415
    assert json.loads(garbage.value.response.text)["error"]["code"] == "unsupported_audio"


def _multipart(body: bytes, *, declared: int | None = None) -> bytes:
    """A hand-written transcription request (boundary ``b``) with ``body``; ``declared``: a
    Content-Length other than the body's."""
    length = len(body) if declared is None else declared
    return (
        b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n"
        + f"Content-Length: {length}\r\n\r\n".encode()
        + body
    )


def _raw(stack: Stack, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send a hand-written HTTP request; the status and the JSON error body."""
    port = int(stack.metrics_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def test_hostile_requests_get_their_status_and_nothing_is_queued(
    stack: Stack, jfk: Clip
) -> None:
    queued_before = await trio.to_thread.run_sync(stream_messages, stack.nats_url)
    bomb = _multipart(b"--b\r\n", declared=2147483648)
    status, body = await trio.to_thread.run_sync(_raw, stack, bomb)
    assert (status, body["error"]["code"]) == (413, "too_large")
    head = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    truncated = head + jfk.path.read_bytes()[:5000]  # no closing boundary
    status, body = await trio.to_thread.run_sync(_raw, stack, _multipart(truncated))
    assert status == 400, body
    no_file = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n--b--\r\n'
    status, body = await trio.to_thread.run_sync(_raw, stack, _multipart(no_file))
    assert (status, body["error"]["code"]) == (400, "bad_message")
    assert "file" in body["error"]["message"]
    assert await trio.to_thread.run_sync(stream_messages, stack.nats_url) == queued_before
    # The door still serves.
    with jfk.path.open("rb") as f:
        text = _client(stack).audio.transcriptions.create(model="whisper-1", file=f).text
    assert wer(jfk.reference, text) <= 0.05


@pytest.mark.parametrize("out_format", ["txt", "srt", "vtt", "json"])
def test_the_cli_writes_the_same_formats(stack: Stack, jfk: Clip, out_format: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "katydid", "transcribe", "--url", stack.url,
         "--format", out_format, str(jfk.path)],
        capture_output=True, text=True, timeout=120, check=False, env=stack.env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    if out_format == "json":
        text = json.loads(out)["text"]
    else:
        text = " ".join(
            ln for ln in out.splitlines()
            if ln and "-->" not in ln and not ln.isdigit() and ln != "WEBVTT"
        )  # fmt: skip
    assert wer(jfk.reference, text) <= 0.05, out
    if out_format in ("srt", "vtt"):
        assert out.count("-->") >= 1


def test_a_long_file_streams_one_delta_per_utterance(stack: Stack, speech_dir: Path) -> None:
    clip = next(
        c for c in read_manifest(speech_dir / "manifest.tsv") if c.path.parent.name == "long"
    )
    with clip.path.open("rb") as f:
        events = list(
            _client(stack).audio.transcriptions.create(model="whisper-1", file=f, stream=True)
        )
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) >= 4  # cut at pauses, fanned out, delivered in order as they came
    assert "".join(deltas) == events[-1].text
    assert wer(clip.reference, events[-1].text) <= 0.15


def test_overloaded_is_429_with_retry_after(tmp_path: Path, model_dir: Path, jfk: Clip) -> None:
    # An upload admitted before it (its job counted ahead) makes the wait for the one worker
    # longer than a wait this short: the request is refused at admission.
    with Stack(tmp_path, model_dir, workers=1, default_max_wait_s=0.01) as busy:
        wait_until(lambda: http_get(busy.metrics_url + "/readyz")[0] == 200, 30, "ready")
        with ws_connect(busy.url) as ahead, jfk.path.open("rb") as f:
            ahead.send(json.dumps({"type": "start", "format": "wav"}))
            assert json.loads(ahead.recv(timeout=30))["type"] == "ready"
            with pytest.raises(openai.RateLimitError) as refused:
                _client(busy).audio.transcriptions.create(model="whisper-1", file=f)
        assert refused.value.status_code == 429
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert json.loads(refused.value.response.text)["error"]["code"] == "overloaded"
        assert stream_messages(busy.nats_url) == 0  # nothing queued for a refused request


def test_an_upload_that_stops_coming_is_timed_out(tmp_path: Path, model_dir: Path) -> None:
    # A body declared 100 kB, sent a header's worth, then nothing (slowloris): the connection
    # was held for good; now 408 after idle_timeout_s, and the connection closed.
    with Stack(tmp_path, model_dir, workers=1, idle_timeout_s=2.0) as s:
        host, port = s.metrics_url.removeprefix("http://").rsplit(":", 1)
        head = (
            "POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
            'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF'
        )
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(head.encode())
            answer = b""
            while chunk := sock.recv(65536):  # until the server closes (or 30 s: a failure)
                answer += chunk
        status_line, _, rest = answer.decode().partition("\r\n")
        assert status_line.split()[1] == "408", answer
        assert json.loads(rest.partition("\r\n\r\n")[2])["error"]["code"] == "timeout"
