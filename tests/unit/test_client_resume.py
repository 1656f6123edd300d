"""client.transcribe resumes a session across a dropped connection (spec/resume.md), against a
fake gateway in the test that speaks the contract: ``ready`` with a token, a TCP reset mid-stream
(no close frame), then a resume it checks (token, after_seq, the audio sent again) and answers."""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from katydid import client
from katydid.client_resume import ResumeOptions, ResumeState, resend_offset

_SESSION = "5b0c7f2e9a1d4c3b8e6f0a2d4c6e8f10"


def _final(seq: int) -> dict[str, Any]:
    return {"type": "final", "seq": seq, "start_s": seq * 1.0, "end_s": seq + 1.0,
            "text": f"utterance {seq}", "segments": []}  # fmt: skip


def _pcm(seconds: float) -> bytes:
    # Every byte pair distinct-ish, so an offset off by a frame shows.
    return bytes((i * 7 + i // 256) % 256 for i in range(int(seconds * 32_000)))


async def _reset(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


@dataclass
class FakeGateway:
    """Connection 1: ``ready`` (with a token unless ``token`` is None), reads audio until it has
    ``drop_after_bytes`` (or ``stop``), sends ``finals_before_drop`` finals, then resets the TCP
    connection. Later connections: a resume, answered per the fields; every message after
    ``resumed`` is recorded (``after_resume``), the rest of the finals and ``done`` sent."""

    drop_after_bytes: int = 16_000
    finals_before_drop: int = 2
    chunks: int = 4
    token: str | None = "t1"
    audio_received_s: float = 0.4
    offset_bytes: int | None = 12_800
    audio_complete: bool = False
    answer_error: str | None = None  # e.g. resume_expired
    replay_duplicate: bool = True  # resend the last final the client had: it must drop it
    refuse_after_first: bool = False  # later connections are cut before the handshake
    connections: int = 0
    attempt_times: list[float] = field(default_factory=list)
    resume_starts: list[dict[str, Any]] = field(default_factory=list)
    after_resume: list[str | bytes] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self.attempt_times.append(trio.current_time())
        first = self.connections == 1
        if not first and self.refuse_after_first:
            await _reset(stream)
            return
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(nursery, stream)
            ws = await request.accept()
            try:
                await (self._first(ws, stream) if first else self._resume(ws))
            except ConnectionClosed:
                pass
            nursery.cancel_scope.cancel()

    async def _first(self, ws: WebSocketConnection, stream: trio.SocketStream) -> None:
        json.loads(await ws.get_message())
        ready = {"type": "ready", "session_id": _SESSION, "protocol": 1}
        if self.token is not None:
            ready["resume_token"] = self.token
        await ws.send_message(json.dumps(ready))
        got = 0
        while got < self.drop_after_bytes:
            message = await ws.get_message()
            if isinstance(message, str):
                break  # stop
            got += len(message)
        for seq in range(self.finals_before_drop):
            await ws.send_message(json.dumps(_final(seq)))
        await trio.sleep(0.2)  # the finals are read before the reset (RST drops unread data)
        await _reset(stream)

    async def _resume(self, ws: WebSocketConnection) -> None:
        start = json.loads(await ws.get_message())
        self.resume_starts.append(start)
        if self.answer_error:
            error = {"type": "error", "code": self.answer_error, "message": "window passed"}
            await ws.send_message(json.dumps(error))
            await ws.aclose(4410)
            return
        after = int(start["resume"]["after_seq"])
        resumed: dict[str, Any] = {
            "type": "resumed", "session_id": _SESSION, "resume_token": "t2",
            "audio_received_s": self.audio_received_s, "audio_complete": self.audio_complete,
            "after_seq": after,
        }  # fmt: skip
        if self.offset_bytes is not None:
            resumed["resume_offset_bytes"] = self.offset_bytes
        await ws.send_message(json.dumps(resumed))
        if self.replay_duplicate and after >= 0:
            await ws.send_message(json.dumps(_final(after)))
        if self.audio_complete:
            with trio.move_on_after(0.3):  # it must send nothing: wait a while for anything
                self.after_resume.append(await ws.get_message())
        else:
            while (message := await ws.get_message()) != json.dumps({"type": "stop"}):
                self.after_resume.append(message)
            self.after_resume.append(message)
        for seq in range(after + 1, self.chunks):
            await ws.send_message(json.dumps(_final(seq)))
        done = {"type": "done", "chunks": self.chunks, "audio_s": 2.0, "failed_chunks": 0}
        await ws.send_message(json.dumps(done))
        await ws.aclose(1000)

    def resent_audio(self) -> bytes:
        return b"".join(m for m in self.after_resume if isinstance(m, bytes))


async def _serve(nursery: trio.Nursery, fake: FakeGateway) -> str:
    listeners = await nursery.start(trio.serve_tcp, fake.handle, 0)
    return f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"


async def test_finals_arrive_once_in_order_across_a_drop_and_pcm_is_resent_from_the_offset(
    nursery: trio.Nursery,
) -> None:
    fake = FakeGateway()
    url = await _serve(nursery, fake)
    audio = _pcm(2.0)
    seen: list[dict[str, Any]] = []
    status: list[str] = []
    result = await client.transcribe(
        url, audio, on_event=seen.append, on_status=status.append, session_timeout_s=20
    )
    assert [f["seq"] for f in result.finals] == [0, 1, 2, 3]
    assert [e["seq"] for e in seen if e["type"] == "final"] == [0, 1, 2, 3]
    assert result.done is not None
    assert result.lost_seqs == []
    assert result.duplicates == 1  # the fake replayed seq 1: dropped, counted
    assert result.out_of_order == 0
    assert status == ["reconnecting", "resumed"]
    assert result.resumes == 1
    assert len(result.resume_latencies_s) == 1
    assert len(result.outage_to_final_s) == 1
    assert result.resume_latencies_s[0] <= result.outage_to_final_s[0]  # no backoff in it
    (start,) = fake.resume_starts
    assert start["resume"] == {"session_id": _SESSION, "token": "t1", "after_seq": 1}
    assert fake.resent_audio() == audio[12_800:]
    assert fake.after_resume[-1] == json.dumps({"type": "stop"})


async def test_the_offset_is_worked_out_from_audio_received_s_without_the_server_s_figure(
    nursery: trio.Nursery,
) -> None:
    fake = FakeGateway(offset_bytes=None, audio_received_s=0.25003)
    url = await _serve(nursery, fake)
    audio = _pcm(2.0)
    result = await client.transcribe(url, audio, session_timeout_s=20)
    assert result.done is not None
    assert fake.resent_audio() == audio[8_000:]  # floor(0.25003 * 16000) * 1 * 2


async def test_a_container_file_is_resent_whole(nursery: trio.Nursery) -> None:
    fake = FakeGateway(drop_after_bytes=100_000, offset_bytes=None)
    url = await _serve(nursery, fake)
    data = b"RIFF" + bytes(range(256)) * 1000
    result = await client.transcribe(url, data, fmt="wav", frame_bytes=65_536, session_timeout_s=20)
    assert [f["seq"] for f in result.finals] == [0, 1, 2, 3]
    assert fake.resent_audio() == data


async def test_audio_complete_means_nothing_is_resent(nursery: trio.Nursery) -> None:
    fake = FakeGateway(drop_after_bytes=10**9, audio_complete=True)
    url = await _serve(nursery, fake)
    result = await client.transcribe(url, _pcm(1.0), session_timeout_s=20)
    assert [f["seq"] for f in result.finals] == [0, 1, 2, 3]
    assert fake.after_resume == []  # neither audio nor stop


async def test_an_expired_session_is_a_clear_client_error_with_what_came(
    nursery: trio.Nursery,
) -> None:
    fake = FakeGateway(answer_error="resume_expired")
    url = await _serve(nursery, fake)
    with pytest.raises(client.ClientError) as caught:
        await client.transcribe(url, _pcm(2.0), session_timeout_s=20)
    assert caught.value.kind == "resume_expired"
    assert "resume window" in str(caught.value)
    assert caught.value.result is not None
    assert [f["seq"] for f in caught.value.result.finals] == [0, 1]


async def test_reconnecting_backs_off_and_gives_up_in_time(nursery: trio.Nursery) -> None:
    # A server that cuts every new connection: the attempts are spaced, growing, and end with
    # reconnect_s, not a spin loop.
    fake = FakeGateway(refuse_after_first=True)
    url = await _serve(nursery, fake)
    began = trio.current_time()
    with pytest.raises(client.ClientError) as caught:
        await client.transcribe(url, _pcm(2.0), resume=ResumeOptions(reconnect_s=1.5))
    assert caught.value.kind == "reconnect_failed"
    elapsed = trio.current_time() - began
    retries = fake.attempt_times[1:]
    gaps = [b - a for a, b in zip(fake.attempt_times[1:], fake.attempt_times[2:], strict=False)]
    assert 2 <= len(retries) <= 7, retries  # 0.1-0.2, 0.2-0.4, 0.4-0.8 s... within 1.5 s
    assert min(gaps) >= 0.15
    assert gaps == sorted(gaps) or max(gaps) >= 0.4  # they grow (jitter aside)
    assert 0.5 <= elapsed <= 3.5  # it stops once the next wait would pass reconnect_s


async def test_a_server_without_resume_tokens_ends_the_session_as_before(
    nursery: trio.Nursery,
) -> None:
    fake = FakeGateway(token=None)
    url = await _serve(nursery, fake)
    result = await client.transcribe(url, _pcm(2.0), session_timeout_s=20)
    assert result.done is None
    assert result.close_code == 1006
    assert [f["seq"] for f in result.finals] == [0, 1]
    assert fake.connections == 1


async def test_no_resume_when_disabled(nursery: trio.Nursery) -> None:
    fake = FakeGateway()
    url = await _serve(nursery, fake)
    result = await client.transcribe(url, _pcm(2.0), resume=ResumeOptions(enabled=False))
    assert result.done is None
    assert fake.connections == 1


async def test_a_lost_connection_is_resumed_on_a_fallback_url(nursery: trio.Nursery) -> None:
    # The first gateway dies after the drop (refuses every later connection); the second one,
    # of the same deployment, only resumes: the client goes there first and gets the rest.
    first = FakeGateway(refuse_after_first=True)
    other = FakeGateway(connections=1)  # its first connection is a resume
    url, fallback = await _serve(nursery, first), await _serve(nursery, other)
    result = await client.transcribe(url, _pcm(2.0), fallback_urls=[fallback], session_timeout_s=20)
    assert [f["seq"] for f in result.finals] == [0, 1, 2, 3]
    assert result.done is not None
    assert result.resumes == 1
    assert first.connections == 1
    (start,) = other.resume_starts
    assert start["resume"]["after_seq"] == 1


async def test_live_audio_older_than_the_buffer_fails_plainly(nursery: trio.Nursery) -> None:
    # Paced 0.6 s; the connection drops after 0.5 s; the server asks for audio from 0 s, but
    # the client keeps only the last 0.2 s: an error, not a silent gap.
    fake = FakeGateway(drop_after_bytes=16_000, offset_bytes=0, audio_received_s=0.0)
    url = await _serve(nursery, fake)
    with pytest.raises(client.ClientError) as caught:
        await client.transcribe(
            url, _pcm(0.6), realtime=True, resume=ResumeOptions(buffer_s=0.2), session_timeout_s=20
        )
    assert caught.value.kind == "resume_gap"


def test_dedupe_by_seq_and_the_resume_start() -> None:
    state, result = ResumeState(), client.SessionResult()
    state.on_ready({"type": "ready", "session_id": _SESSION, "resume_token": "a"})
    assert [state.accept(_final(s), result) for s in (0, 1, 1, 3, 2, 0)] == [
        True, True, False, True, True, False,
    ]  # fmt: skip
    assert (result.duplicates, result.out_of_order, state.after_seq) == (2, 1, 3)
    state.on_resumed({"type": "resumed", "resume_token": "b"})
    assert state.start_message("k") == {
        "type": "start", "api_key": "k",
        "resume": {"session_id": _SESSION, "token": "b", "after_seq": 3},
    }  # fmt: skip


def test_resend_offsets() -> None:
    def offset(resumed: dict[str, Any], fmt: str = "pcm_s16le") -> int | None:
        return resend_offset(resumed, fmt=fmt, sample_rate=16_000, channels=2, size=64_000)

    assert offset({"audio_complete": True}) is None
    assert offset({"audio_received_s": 0.5}) == 32_000
    assert offset({"resume_offset_bytes": 1_001}) == 1_000  # a frame boundary
    assert offset({"resume_offset_bytes": 10**9}) == 64_000
    assert offset({"audio_received_s": 3.0}, fmt="wav") == 0


def test_a_chunk_with_no_words_is_not_a_lost_final() -> None:
    # No final is sent for a chunk whose audio held no words: done names it (since the last
    # resume); before a resume's after_seq, results came in order, so a gap there was one too.
    def result(*events: dict[str, Any]) -> client.SessionResult:
        res = client.SessionResult()
        res.events.extend(events)
        return res

    final = {"type": "final", "seq": 0, "text": "a"}
    assert result(final, {"type": "done", "chunks": 3, "silent": [1]}).lost_seqs == [2]
    assert result(final, {"type": "done", "chunks": 2, "silent": [1]}).lost_seqs == []
    resumed = {"type": "resumed", "after_seq": 2}  # seq 1 had no words, before the break
    two = {"type": "final", "seq": 2, "text": "b"}
    assert result(final, two, resumed, {"type": "done", "chunks": 3, "silent": []}).lost_seqs == []
    assert result(final, resumed, {"type": "done", "chunks": 4, "silent": [3]}).lost_seqs == []
