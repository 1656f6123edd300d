"""Per-session models and options through the real stack: a tiny.en worker and a multilingual
base worker behind one gateway, real speech, refusals at start."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from katydid import client
from katydid.config import DEFAULT_MODEL
from katydid.evaluation import Clip, read_manifest, word_errors
from katydid.languages import WHISPER_LANGUAGES
from tests.integration.stack import Stack, stream_messages

pytestmark = pytest.mark.integration
TINY_WORKER, BASE_WORKER = "test-w0", "test-w1"


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, base_model: str
) -> Iterator[Stack]:
    with Stack(
        tmp_path_factory.mktemp("models"), model_dir, workers=[DEFAULT_MODEL, base_model]
    ) as s:
        yield s


@pytest.fixture(scope="module")
def clips(speech_dir: Path) -> dict[str, Clip]:
    return {
        c.name: c
        for c in read_manifest(speech_dir / "manifest.tsv")
        if c.path.parent.name != "long"
    }


async def _run(stack: Stack, clip: Clip, **options: Any) -> client.SessionResult:
    return await client.transcribe(
        stack.url, clip.path.read_bytes(), fmt="wav", frame_bytes=65_536, options=options
    )


async def _offered(stack: Stack) -> set[str]:
    """The models a new session's ``ready`` lists now."""
    async with client.connect(stack.url) as ws:
        await ws.send_message('{"type": "start"}')
        with trio.fail_after(10):
            ready = json.loads(await ws.get_message())
        await ws.aclose()
    assert ready["type"] == "ready", ready
    return {m["name"] for m in ready["models"]}


async def _refused(stack: Stack, start: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Send ``start``; return the error event it gets and the close code."""
    async with client.connect(stack.url) as ws:
        await ws.send_message(json.dumps({"type": "start", **start}))
        events = []
        with trio.fail_after(10):
            try:
                while True:
                    events.append(json.loads(await ws.get_message()))
            except ConnectionClosed as exc:
                code = exc.reason.code if exc.reason else None
    assert [e["type"] for e in events] == ["error"], events
    return events[0], code


async def test_ready_lists_the_models_and_the_session_model(
    stack: Stack, clips: dict[str, Clip]
) -> None:
    res = await _run(stack, clips["sr_english_123.wav"])
    ready = res.events[0]
    assert ready["type"] == "ready"
    assert ready["model"] == DEFAULT_MODEL
    by_name = {m["name"]: m for m in ready["models"]}
    assert by_name[DEFAULT_MODEL]["languages"] == ["en"]
    assert by_name["base-q8_0"]["languages"] == list(WHISPER_LANGUAGES)
    assert all(m["workers"] == 1 for m in by_name.values())


@pytest.mark.parametrize(
    ("start", "code", "needle"),
    [
        ({"language": "de"}, "unsupported_option", "language 'de' needs a multilingual model"),
        ({"language": "xx", "model": "base"}, "unsupported_option", "unknown language 'xx'"),
        ({"task": "translate"}, "unsupported_option", "task 'translate' needs a multilingual"),
        ({"model": "small"}, "unsupported_option", "no worker serves model 'small'"),
        ({"prompt": "ü" * 600}, "too_large", "start.prompt is 1200 bytes"),
    ],
)
async def test_what_a_model_cannot_do_is_refused_at_start(
    stack: Stack, start: dict[str, Any], code: str, needle: str
) -> None:
    before = stream_messages(stack.nats_url)
    error, close = await _refused(stack, start)
    assert error["code"] == code
    assert needle in error["message"]
    assert close == (1003 if code == "unsupported_option" else 1009)
    if code == "unsupported_option" and "model" not in start:
        # The message names what the server does offer.
        assert "base-q8_0 (99 languages)" in error["message"]
    assert stream_messages(stack.nats_url) == before  # nothing was queued


async def test_word_timestamps(stack: Stack, clips: dict[str, Clip]) -> None:
    jfk = clips["jfk.wav"]
    res = await _run(stack, jfk, word_timestamps=True)
    assert res.done is not None, res.events
    words_seen = 0
    last_end = 0.0
    for final in res.finals:
        for seg in final["segments"]:
            words = seg["words"]
            # The words are the segment's text, split.
            assert word_errors(seg["text"], " ".join(w["word"] for w in words)) == (
                0,
                len(seg["text"].split()),
            )
            for w in words:
                assert seg["start_s"] <= w["start_s"] <= w["end_s"] <= seg["end_s"]
                assert w["start_s"] >= last_end - 1e-6  # monotonic across the session
                last_end = w["end_s"]
            words_seen += len(words)
    assert words_seen >= 20
    assert 0 < last_end <= 11.0 + 1e-6


async def test_a_prompt_steers_the_output(stack: Stack, clips: dict[str, Clip]) -> None:
    # Spoken "one two three": without a prompt tiny.en writes digits; a prompt in words steers
    # it to words (the same after normalisation, so no WER threshold tells them apart).
    clip = clips["sr_english_123.wav"]
    plain = await _run(stack, clip)
    steered = await _run(stack, clip, prompt="One, two, three, four.")
    assert plain.done is not None, plain.events
    assert steered.done is not None, steered.events
    assert plain.text, plain.events
    assert steered.text != plain.text
    assert steered.text.lower().startswith("one"), steered.text


async def test_base_auto_detects_english_and_each_model_gets_its_own_jobs(
    stack: Stack, clips: dict[str, Clip]
) -> None:
    names = sorted(clips)
    tiny: dict[str, client.SessionResult] = {}
    base: dict[str, client.SessionResult] = {}

    async def one(name: str) -> None:
        tiny[name] = await _run(stack, clips[name])
        base[name] = await _run(stack, clips[name], model="base", language="auto")

    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(one, name)
    for name in names:
        assert tiny[name].done is not None, tiny[name].events
        assert base[name].done is not None, base[name].events
        assert base[name].events[0]["model"] == "base-q8_0"
        # Routed by model: every chunk went to a worker of the model the session chose.
        assert {f["worker"] for f in tiny[name].finals} <= {TINY_WORKER}
        assert {f["worker"] for f in base[name].finals} <= {BASE_WORKER}
        assert {f["language"] for f in base[name].finals} <= {"en"}
    assert any(r.finals for r in base.values())

    def pooled(results: dict[str, client.SessionResult]) -> float:
        pairs = [word_errors(clips[n].reference, results[n].text) for n in names]
        return sum(e for e, _ in pairs) / sum(w for _, w in pairs)

    tiny_wer, base_wer = pooled(tiny), pooled(base)
    assert base_wer <= tiny_wer + 0.02, (base_wer, tiny_wer)
    jobs = {
        i: [e for e in stack.log_events(f"worker{i}") if e.get("event") == "job"] for i in (0, 1)
    }
    assert len(jobs[1]) >= len(names)  # the base worker did base's work...
    base_sessions = {r.session_id for r in base.values()}
    assert not any(e["session_id"] in base_sessions for e in jobs[0])  # ...and only it


async def test_a_model_whose_workers_left_is_refused_with_a_retry_after(
    stack: Stack, clips: dict[str, Clip]
) -> None:
    # Last in this module: it stops the base worker. Its heartbeats end; after three missed
    # beats the gateway stops offering the model.
    stack.workers[1].terminate()
    stack.workers[1].wait(timeout=30)
    with trio.fail_after(10):
        while "base-q8_0" in await _offered(stack):  # noqa: ASYNC110 - asks the gateway
            await trio.sleep(0.1)
    # A model a worker served is gone: the server's condition, said with a retry-after, not
    # the client's error.
    error, close = await _refused(stack, {"model": "base"})
    assert error["code"] == "overloaded", error
    assert "model 'base' has no live worker now" in error["message"]
    assert error["retry_after_s"] >= 1.0
    assert close == 1013
    # One nobody configured and no worker announced is still the client's error.
    error, close = await _refused(stack, {"model": "large-v3"})
    assert (error["code"], close) == ("unsupported_option", 1003)
    # The default model is still served.
    res = await _run(stack, clips["sr_english_123.wav"])
    assert res.done is not None, res.events
