"""A result published on a gateway's results subject by something that never held the job (any
NATS client can publish there) does not reach the session: only the worker's answer does."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest
import trio

from katydid import client
from katydid.evaluation import read_manifest, wer
from katydid.messages import STREAM
from tests.integration.stack import Stack, stream_messages, wait_until

pytestmark = pytest.mark.integration


def _forge(nats_url: str) -> None:
    """Read the queued job's headers from the stream (as `nats stream view` shows them) and
    answer it first, with a transcript of our own and no token."""

    async def go() -> None:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(STREAM)
            msg = await js.get_msg(STREAM, info.state.first_seq)
            h = msg.headers or {}
            for token in ("", "0" * 32):
                forged = {
                    "job": h["Katydid-Job"],
                    "session": h["Katydid-Session"],
                    "seq": int(h["Katydid-Seq"]),
                    "kind": "final",
                    "text": "FORGED TRANSCRIPT",
                    "segments": [{"start_s": 0.0, "end_s": 1.0, "text": "FORGED TRANSCRIPT"}],
                    "worker": "attacker",
                    "error": None,
                    "token": token,
                }
                # Under a sender name, as workers answer (the gateway hears <reply>.<sender>).
                await nc.publish(h["Katydid-Reply"] + ".attacker", json.dumps(forged).encode())
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(go())


async def test_a_forged_result_never_reaches_the_session(
    tmp_path: Path, model_dir: Path, speech_dir: Path
) -> None:
    with Stack(tmp_path, model_dir, workers=0) as stack:
        data = (speech_dir / "jfk.wav").read_bytes()
        result: list[client.SessionResult] = []
        async with trio.open_nursery() as nursery:

            async def session() -> None:
                result.append(await client.transcribe(stack.url, data, fmt="wav"))

            nursery.start_soon(session)
            await trio.to_thread.run_sync(
                lambda: wait_until(
                    lambda: stream_messages(stack.nats_url) == 1, 30, "the job to be queued"
                )
            )
            await trio.to_thread.run_sync(_forge, stack.nats_url)
            await trio.to_thread.run_sync(
                lambda: wait_until(
                    lambda: "forged_result" in stack.log("gateway"), 10, "the forgery to be seen"
                )
            )
            stack.start_worker(0)  # now the real answer
        res = result[0]
        assert res.done is not None, res.events
        assert "FORGED" not in res.text
        assert {f["worker"] for f in res.finals} == {"test-w0"}
        jfk = next(c for c in read_manifest(speech_dir / "manifest.tsv") if c.name == "jfk.wav")
        assert wer(jfk.reference, res.text) <= 0.1
