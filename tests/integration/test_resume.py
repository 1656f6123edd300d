"""Sessions outlive their connection and their gateway: a client of the ``websockets`` library
(not ours) streams real speech to one gateway, loses its connection (a reset, or the gateway
SIGKILLed), resumes on another gateway of the same NATS, and gets every final once and in order,
as accurately as an undisturbed run. A wrong token and an unknown session are refused, coded."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import trio
import websockets

from katydid import client
from katydid.evaluation import read_manifest, wer
from tests.integration.stack import Stack, free_port, port_open, wait_until

pytestmark = pytest.mark.integration

FRAME = 16_000  # bytes per frame sent: 0.5 s of 16 kHz s16le


def _mix(speech_dir: Path) -> tuple[bytes, str]:
    """A real multi-speaker recording (61-91 s) as 16 kHz s16le, and its reference."""
    clip = read_manifest(speech_dir / "mixes.tsv")[0]
    audio, rate = sf.read(str(clip.path), dtype="int16")
    assert rate == 16_000
    assert audio.ndim == 1
    return np.asarray(audio).tobytes(), clip.reference


async def _recv(ws: Any) -> Any:
    """The server's next message, bounded: a server that says nothing fails the test."""
    return await asyncio.wait_for(ws.recv(), 30)


async def _events(ws: Any, into: list[dict[str, Any]], until: str = "done") -> None:
    async for raw in ws:
        event = json.loads(raw)
        into.append(event)
        if event["type"] in (until, "error"):
            return


async def _interrupted(url: str, pcm: bytes, cut_at: int, cut: Any) -> list[dict[str, Any]]:
    """Stream ``pcm`` to ``url`` until byte ``cut_at``, read what came, then ``cut`` the
    connection (without a close frame)."""
    events: list[dict[str, Any]] = []
    ws = await websockets.connect(url, max_size=None)
    await ws.send(json.dumps({"type": "start", "format": "pcm_s16le", "sample_rate": 16000}))
    events.append(json.loads(await _recv(ws)))
    assert events[0]["type"] == "ready", events[0]
    assert events[0]["resume_token"], events[0]
    for i in range(0, cut_at, FRAME):
        await ws.send(pcm[i : min(i + FRAME, cut_at)])
    # The finals of what was cut so far (at most a few seconds), then the cut
    try:
        await asyncio.wait_for(_events(ws, events, until="final"), 20)
        await asyncio.wait_for(_events(ws, events, until="final"), 2)
    except TimeoutError:
        pass
    await cut(ws)
    return events


async def _resume(url: str, pcm: bytes, ready: dict[str, Any], after_seq: int) -> list[Any]:
    events: list[dict[str, Any]] = []
    async with websockets.connect(url, max_size=None) as ws:
        resume = {"session_id": ready["session_id"], "token": ready["resume_token"]}
        await ws.send(json.dumps({"type": "start", "resume": resume | {"after_seq": after_seq}}))
        resumed = json.loads(await _recv(ws))
        assert resumed["type"] == "resumed", resumed
        assert resumed["session_id"] == ready["session_id"]
        assert not resumed["audio_complete"]
        offset = resumed["resume_offset_bytes"]
        assert offset == round(resumed["audio_received_s"] * 16000) * 2
        for i in range(offset, len(pcm), FRAME):
            await ws.send(pcm[i : i + FRAME])
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(_events(ws, events), 120)
    return [resumed, *events]


def _finals(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "final"]


async def _undisturbed(url: str, pcm: bytes) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "format": "pcm_s16le"}))
        for i in range(0, len(pcm), FRAME):
            await ws.send(pcm[i : i + FRAME])
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(_events(ws, events), 120)
    return events


async def _refused(url: str, resume: dict[str, Any]) -> tuple[str, int | None]:
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"type": "start", "resume": resume}))
        error = json.loads(await _recv(ws))
        try:
            await _recv(ws)
        except websockets.ConnectionClosed as exc:
            return error["code"], exc.rcvd.code if exc.rcvd else None
    raise AssertionError("not closed")


def _second_gateway(stack: Stack) -> str:
    port = free_port()
    stack.env["KATYDID_HTTP_PORT"] = "-1"
    stack._spawn(
        [sys.executable, "-m", "katydid", "gateway", "--port", str(port)],
        "gateway2",
        stack.role_env.get("gateway"),
    )
    wait_until(lambda: port_open(port), 60, "second gateway")
    return f"ws://127.0.0.1:{port}"


def _doc_example() -> Any:
    """The resume example of docs/protocol.md, as a user would paste it."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    section = doc.split("### Resuming a session", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    exec(compile(code, "docs/protocol.md", "exec"), namespace)  # our own docs, as pasted
    return namespace["transcribe"]


async def _cutting_proxy(target_port: int, cut_after: int) -> tuple[Any, list[int]]:
    """A TCP proxy to the gateway that resets the first connection once ``cut_after`` bytes
    went from the client to the server (a network change mid-stream); later ones pass."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        first = len(connections) == 1
        up_r, up_w = await asyncio.open_connection("127.0.0.1", target_port)

        async def pipe(src: Any, dst: Any, count: bool) -> None:
            sent = 0
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                    sent += len(data) if count else 0
                    if first and count and sent >= cut_after:
                        writer.transport.abort()
                        up_w.transport.abort()
                        return
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_w, True), pipe(up_r, writer, False))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, connections


async def _through_proxy(port: int, pcm: bytes) -> tuple[list[str], int]:
    server, connections = await _cutting_proxy(port, len(pcm) // 2)
    async with server:
        proxy_port = server.sockets[0].getsockname()[1]
        texts = await asyncio.wait_for(_doc_example()(f"ws://127.0.0.1:{proxy_port}", pcm), 180)
    return texts, len(connections)


mine_statuses: list[str] = []


def _our_client_reset_once(url: str, wav: bytes) -> client.SessionResult:
    """``katydid.client.transcribe`` with its first connection reset once its first final came
    (the load tester's fault hook, a TCP reset with no close frame)."""
    first_final = trio.Event()
    cuts: list[int] = []

    async def fault(link: Any) -> None:
        if cuts:
            return
        await first_final.wait()
        cuts.append(1)
        await link.abort()

    def seen(event: dict[str, Any]) -> None:
        if event["type"] == "final":
            first_final.set()

    async def run() -> client.SessionResult:
        return await client.transcribe(
            url, wav, fmt="wav", on_event=seen, fault=fault, on_status=mine_statuses.append
        )

    return trio.run(run)


async def _reset(ws: Any) -> None:
    ws.transport.abort()  # a TCP reset: no close frame


def test_a_session_resumes_on_another_gateway_after_a_reset_and_after_a_sigkill(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    pcm, reference = _mix(speech_dir)
    with Stack(tmp_path, model_dir, workers=1, nats_accounts=True) as stack:
        other = _second_gateway(stack)
        whole = asyncio.run(_undisturbed(other, pcm))
        assert whole[-1]["type"] == "done", whole[-1]
        baseline = wer(reference, " ".join(f["text"] for f in _finals(whole)))

        def gateway_killed() -> Any:
            async def kill(_ws: Any) -> None:
                stack.gateway.send_signal(signal.SIGKILL)
                stack.gateway.wait(10)

            return kill

        for cut in (_reset, gateway_killed()):
            before = asyncio.run(_interrupted(stack.url, pcm, len(pcm) // 2, cut))
            seqs = [f["seq"] for f in _finals(before)]
            after_seq = max(seqs, default=-1)
            after = asyncio.run(_resume(other, pcm, before[0], after_seq))
            # Some results came before the cut and some audio was in jobs: a real resume
            assert seqs, before
            assert after[0]["audio_received_s"] > 0, after[0]
            finals = _finals(before) + _finals(after)
            done = after[-1]
            assert done["type"] == "done", after[-3:]
            # Every final once, in order, nothing missing
            assert [f["seq"] for f in finals] == list(range(done["chunks"])), finals
            text = " ".join(f["text"] for f in finals)
            assert wer(reference, text) <= baseline + 0.02, (baseline, text)

        # The docs' example (a user's own websockets code) through a connection cut mid-stream
        texts, connections = asyncio.run(_through_proxy(int(other.rsplit(":", 1)[1]), pcm))
        assert connections == 2
        assert wer(reference, " ".join(texts)) <= baseline + 0.02, texts

        # Our own client, a WAV file uploaded whole, its connection reset mid-transcript: it
        # reconnects by itself, to the other gateway, and resumes
        mix = read_manifest(speech_dir / "mixes.tsv")[0].path.read_bytes()
        mine = _our_client_reset_once(other, mix)
        assert mine.done is not None, mine.events
        assert [f["seq"] for f in mine.finals] == list(range(mine.done["chunks"]))
        assert wer(reference, mine.text) <= baseline + 0.02, mine.text
        assert "reconnecting" in mine_statuses

        # A wrong token, and a session nobody has: refused, coded, closed
        ready = before[0]
        wrong = {"session_id": ready["session_id"], "token": "0" * 32, "after_seq": -1}
        assert asyncio.run(_refused(other, wrong)) == ("unauthorized", 4401)
        gone = {"session_id": ready["session_id"], "token": ready["resume_token"]}
        # The session ended with done: nothing to resume
        assert asyncio.run(_refused(other, gone | {"after_seq": -1})) == ("resume_expired", 4410)


def _results_stream(nats_url: str) -> Any:
    """The results stream's info (each resumed session a gateway follows holds a consumer)."""
    import nats

    from katydid.session_record import RESULTS_STREAM

    async def info() -> Any:
        nc = await nats.connect(nats_url)
        try:
            return await nc.jetstream().stream_info(RESULTS_STREAM)
        finally:
            await nc.close()

    return asyncio.run(info())


def _results_consumers(nats_url: str) -> int:
    return int(_results_stream(nats_url).state.consumer_count)


async def _resumed_then_reset(url: str, ready: dict[str, Any]) -> None:
    """A client that resumes and loses the connection at once (a flapping network)."""
    ws = await websockets.connect(url)
    resume = {"session_id": ready["session_id"], "token": ready["resume_token"]}
    await ws.send(json.dumps({"type": "start", "resume": resume | {"after_seq": -1}}))
    resumed = json.loads(await _recv(ws))
    assert resumed["type"] == "resumed", resumed
    await _reset(ws)


def test_quick_resumes_leave_no_results_consumer_behind(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    pcm, _ = _mix(speech_dir)
    pcm = pcm[: 16_000 * 2 * 12]  # 12 s
    with Stack(tmp_path, model_dir, workers=1) as stack:
        before = asyncio.run(_interrupted(stack.url, pcm, len(pcm) // 2, _reset))
        for _ in range(20):
            asyncio.run(_resumed_then_reset(stack.url, before[0]))
        after = asyncio.run(_resume(stack.url, pcm, before[0], -1))
        assert after[-1]["type"] == "done", after[-3:]
        # Each resume followed the session's results with a consumer of its own; a resume
        # that came before the last one's end was carried out replaced it, and the session's
        # end let go of the last: none is left (they were, one per quick resume, for good).
        wait_until(lambda: _results_consumers(stack.nats_url) == 0, 15, "no results consumer")
        # As many sessions may be resumed at once as configured, not nats-server's default
        # of 1,000 consumers a stream.
        assert _results_stream(stack.nats_url).config.max_consumers == 10_000
