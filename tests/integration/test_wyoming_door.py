"""The Wyoming door, tried with the `wyoming` package's own client (as Home Assistant uses it):
describe, then a clip in 100 ms chunks; the streamed transcript chunks and the final transcript
are checked by normalised WER. And bytes that are not Wyoming."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soxr
import trio
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Describe, Info

from katydid.audio import decode_container
from katydid.evaluation import Clip, read_manifest, wer
from tests.integration.stack import Stack, free_port, stream_messages, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    port = free_port()
    with Stack(tmp_path_factory.mktemp("wyoming"), model_dir, workers=2, wyoming_port=port) as s:
        s.wyoming_port = port  # type: ignore[attr-defined]
        yield s


@pytest.fixture(scope="module")
def jfk(speech_dir: Path) -> Clip:
    return next(c for c in read_manifest(speech_dir / "manifest.tsv") if c.name == "jfk.wav")


def _pcm(clip: Clip, rate: int, width: int, channels: int) -> bytes:
    audio = decode_container(clip.path, max_audio_s=60, max_bytes=10**8)
    if rate != 16_000:
        audio = soxr.resample(audio, 16_000, rate).astype(np.float32)
    kind, scale = {2: ("<i2", 32767), 4: ("<i4", 2**31 - 1)}[width]
    samples = np.round(audio * scale).astype(kind)
    return np.repeat(samples, channels).tobytes()  # interleaved: the same voice in each channel


async def _send_audio(
    client: AsyncTcpClient, pcm: bytes, rate: int = 16_000, width: int = 2, channels: int = 1
) -> None:
    """``pcm`` as 100 ms `audio-chunk` events, then `audio-stop`."""
    step = rate * width * channels // 10
    for i in range(0, len(pcm), step):
        chunk = AudioChunk(rate=rate, width=width, channels=channels, audio=pcm[i : i + step])
        await client.write_event(chunk.event())
    await client.write_event(AudioStop().event())


async def _transcribe(
    port: int, pcm: bytes, rate: int, width: int, channels: int
) -> tuple[Info, list[Event]]:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Describe().event())
        info_event = await client.read_event()
        assert info_event is not None
        info = Info.from_event(info_event)
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=rate, width=width, channels=channels).event())
        await _send_audio(client, pcm, rate, width, channels)
        events = []
        while True:
            event = await asyncio.wait_for(client.read_event(), 120)
            assert event is not None, "the server closed the connection"
            events.append(event)
            if Transcript.is_type(event.type) or Error.is_type(event.type):
                return info, events


@pytest.mark.parametrize(("rate", "width", "channels"), [(16_000, 2, 1), (8_000, 4, 2)])
async def test_describe_then_a_streamed_transcript(
    stack: Stack, jfk: Clip, rate: int, width: int, channels: int
) -> None:
    pcm = _pcm(jfk, rate, width, channels)
    port = stack.wyoming_port  # type: ignore[attr-defined]
    info, events = await trio.to_thread.run_sync(
        lambda: asyncio.run(_transcribe(port, pcm, rate, width, channels))
    )
    (program,) = info.asr
    assert program.supports_transcript_streaming
    assert [m.name for m in program.models] == ["tiny.en-q8_0"]
    assert program.models[0].languages == ["en"]
    kinds = [e.type for e in events]
    assert kinds[0] == "transcript-start"
    assert kinds[-2:] == ["transcript-stop", "transcript"]
    assert set(kinds[1:-2]) == {"transcript-chunk"}
    chunks = " ".join(e.data["text"] for e in events if e.type == "transcript-chunk")
    assert wer(jfk.reference, chunks) <= 0.1, chunks
    final = Transcript.from_event(events[-1])
    assert wer(jfk.reference, final.text) <= 0.1, final.text


async def _out_of_order_then_garbage(port: int) -> tuple[Event | None, bytes]:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(
            AudioChunk(rate=16_000, width=2, channels=1, audio=b"\0" * 3200).event()
        )
        refused = await asyncio.wait_for(client.read_event(), 10)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b'{"type": "' + b"x" * (10 * 1024 * 1024) + b'"}\n')  # a 10 MB header line
    try:
        await writer.drain()
    except ConnectionError:
        pass
    try:  # closed by the server: the end of the stream, or a reset (it left bytes unread)
        rest = await asyncio.wait_for(reader.read(), 10)
    except ConnectionResetError:
        rest = b""
    writer.close()
    return refused, rest


async def test_out_of_order_and_garbage(stack: Stack, jfk: Clip) -> None:
    port = stack.wyoming_port  # type: ignore[attr-defined]
    # An earlier test's job still being transcribed would leave the stream meanwhile: start
    # from an empty one, so that "no job was queued" is what the count says.
    await trio.to_thread.run_sync(
        lambda: wait_until(lambda: stream_messages(stack.nats_url) == 0, 120, "an empty stream")
    )
    before = 0
    refused, rest = await trio.to_thread.run_sync(
        lambda: asyncio.run(_out_of_order_then_garbage(port))
    )
    assert refused is not None
    assert Error.from_event(refused).code == "bad_message"
    assert rest == b""
    assert await trio.to_thread.run_sync(stream_messages, stack.nats_url) == before
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass  # still listening
    # and still transcribing
    _, events = await trio.to_thread.run_sync(
        lambda: asyncio.run(_transcribe(port, _pcm(jfk, 16_000, 2, 1), 16_000, 2, 1))
    )
    assert wer(jfk.reference, Transcript.from_event(events[-1]).text) <= 0.1


async def _refusals(port: int, pcm: bytes) -> list[list[str]]:
    """Transcriptions refused in different ways on one connection, each followed by its audio:
    one error each, then a transcription that works."""
    answers: list[list[str]] = []
    async with AsyncTcpClient("127.0.0.1", port) as client:
        for transcribe, start in (
            (Transcribe(name="bogus"), AudioStart(rate=16_000, width=2, channels=1)),
            (Transcribe(), AudioStart(rate=16_000, width=3, channels=1)),
            (Transcribe(), AudioStart(rate=16_000, width=True, channels=1)),  # JSON's true
            (Transcribe(), None),  # audio-chunks without audio-start
            (Transcribe(language="en"), AudioStart(rate=16_000, width=2, channels=1)),
        ):
            await client.write_event(transcribe.event())
            if start is not None:
                await client.write_event(start.event())
            await _send_audio(client, pcm)
            kinds = []
            while True:
                event = await asyncio.wait_for(client.read_event(), 120)
                assert event is not None
                kinds.append(event.type)
                if event.type in ("error", "transcript"):
                    break
            answers.append(kinds)
    return answers


async def test_each_refusal_is_one_error_and_the_connection_goes_on(
    stack: Stack, jfk: Clip
) -> None:
    port = stack.wyoming_port  # type: ignore[attr-defined]
    pcm = _pcm(jfk, 16_000, 2, 1)
    answers = await trio.to_thread.run_sync(lambda: asyncio.run(_refusals(port, pcm)))
    assert answers[:4] == [["error"], ["error"], ["error"], ["error"]]
    assert answers[4][0] == "transcript-start"
    assert answers[4][-1] == "transcript"


async def _stray_after_stop(port: int, pcm: bytes) -> list[Event]:
    """A whole transcription, then at once one more chunk and stop (a client that sends its
    next audio too early): the events that come back until the transcript."""
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=16_000, width=2, channels=1).event())
        await _send_audio(client, pcm)
        stray = AudioChunk(rate=16_000, width=2, channels=1, audio=pcm[:3200])
        await client.write_event(stray.event())
        await client.write_event(AudioStop().event())
        events: list[Event] = []
        while not events or not Transcript.is_type(events[-1].type):
            event = await asyncio.wait_for(client.read_event(), 120)
            assert event is not None, f"closed after {[e.type for e in events]}"
            events.append(event)
        return events


async def test_a_stray_chunk_after_stop_does_not_lose_the_transcript(
    stack: Stack, jfk: Clip
) -> None:
    # The stray chunk failed the transcription ("audio is only allowed between start and
    # stop"): one error, and the transcript of the audio sent never came.
    port = stack.wyoming_port  # type: ignore[attr-defined]
    pcm = _pcm(jfk, 16_000, 2, 1)
    events = await trio.to_thread.run_sync(lambda: asyncio.run(_stray_after_stop(port, pcm)))
    errors = [e.data["text"] for e in events if Error.is_type(e.type)]
    assert errors == ["audio-chunk after audio-stop (ignored)"]
    assert wer(jfk.reference, Transcript.from_event(events[-1]).text) <= 0.1


def test_a_client_that_never_reads_is_let_go(tmp_path: Path, model_dir: Path) -> None:
    # `describe` after `describe`, never reading the answers: the server's writes blocked and
    # the connection stayed open for good (301 s when tried); now closed after send_timeout_s.
    port = free_port()
    with (
        Stack(tmp_path, model_dir, workers=1, wyoming_port=port, send_timeout_s=2.0),
        socket.socket() as sock,
    ):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.settimeout(20)
        sock.connect(("127.0.0.1", port))
        describe = b'{"type": "describe"}\n' * 64
        sent, closed = 0, False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                sent += sock.send(describe)
            except TimeoutError:  # the server stopped reading and never let go
                break
            except OSError:  # reset by the server: it let go
                closed = True
                break
        assert closed, f"still open after {sent} bytes of describe"
