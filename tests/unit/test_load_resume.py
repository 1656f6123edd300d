"""``katydid load --drop-rate``: the load client resets its own connections mid-stream, the
sessions resume (the client's logic, not a second copy), and the report counts the finals."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, wrap_server_stream

from katydid.load.report import markdown, summarize
from katydid.load.runner import ClipData, LoadRunner, LoadSpec

_CHUNK = 8_000  # a final per 0.25 s of audio


@dataclass
class _Session:
    audio: bytearray = field(default_factory=bytearray)
    sent: int = 0  # finals sent (seq 0..sent-1)
    stopped: bool = False


@dataclass
class ResumingGateway:
    """Keeps each session across connections: a final per chunk of audio received, a resume
    answered from what it holds, every final after after_seq sent again."""

    sessions: dict[str, _Session] = field(default_factory=dict)
    resumes: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            ws = await (await wrap_server_stream(nursery, stream)).accept()
            try:
                await self._converse(ws)
            except (ConnectionClosed, trio.BrokenResourceError):
                pass  # the client reset it: the session waits for its resume
            nursery.cancel_scope.cancel()

    async def _converse(self, ws: WebSocketConnection) -> None:
        start = json.loads(await ws.get_message())
        if "resume" in start:
            self.resumes += 1
            sid, after = start["resume"]["session_id"], start["resume"]["after_seq"]
            s = self.sessions[sid]
            resumed = {
                "type": "resumed", "session_id": sid, "resume_token": "t", "after_seq": after,
                "audio_received_s": len(s.audio) / 32_000, "resume_offset_bytes": len(s.audio),
                "audio_complete": s.stopped,
            }  # fmt: skip
            await ws.send_message(json.dumps(resumed))
            for seq in range(after + 1, s.sent):
                await ws.send_message(json.dumps(_final(seq)))
        else:
            sid = f"{len(self.sessions):032x}"
            s = self.sessions[sid] = _Session()
            ready = {"type": "ready", "session_id": sid, "resume_token": "t"}
            await ws.send_message(json.dumps(ready))
        while not s.stopped:
            message = await ws.get_message()
            if isinstance(message, str):
                s.stopped = True
            else:
                s.audio += message
            while s.sent < len(s.audio) // _CHUNK:
                await ws.send_message(json.dumps(_final(s.sent)))
                s.sent += 1
        chunks = -(-len(s.audio) // _CHUNK)
        while s.sent < chunks:
            await ws.send_message(json.dumps(_final(s.sent)))
            s.sent += 1
        await ws.send_message(json.dumps({"type": "done", "chunks": chunks, "audio_s": 1.0}))
        await ws.aclose(1000)


def _final(seq: int) -> dict[str, Any]:
    return {"type": "final", "seq": seq, "start_s": 0.0, "end_s": 0.0, "text": str(seq)}


async def test_dropped_sessions_resume_and_every_final_arrives_once(nursery: trio.Nursery) -> None:
    gateway = ResumingGateway()
    listeners = await nursery.start(trio.serve_tcp, gateway.handle, 0)
    url = f"ws://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"
    clip = ClipData("c", bytes(32_000), "pcm_s16le", 1.0)  # 1 s, streamed in real time
    spec = LoadSpec(url=url, clips=[clip], mode="stream", concurrency=3, duration_s=0.5,
                    drain_s=20, drop_rate=1.0)  # fmt: skip
    stats = await LoadRunner(spec).run()
    assert stats.completed == 3
    summary = summarize(stats, command="katydid load --drop-rate 1")
    resume = summary["resume"]
    assert resume["sessions_dropped"] == 3
    assert resume["resumes"] == 3
    assert gateway.resumes == 3
    assert (resume["finals_lost"], resume["finals_duplicated"], resume["finals_out_of_order"]) == (
        0, 0, 0,
    )  # fmt: skip
    assert resume["reconnect_to_result_s"]["p50"] is not None
    assert "finals lost / duplicated / out of order** | **0 / 0 / 0**" in markdown(summary)
