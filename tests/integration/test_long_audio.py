"""Long recordings of many speakers lose nothing: every shared mix (61-91 s, ten
speakers each, short pauses between them) through the real stack, uploaded whole over the native
WebSocket and through the HTTP door with the `openai` package.

Before the engine decoded uncovered speech again, whisper.cpp's "single timestamp ending" skipped
the rest of a window after a speaker change: mix_4 lost 14 s (19.3% WER), mix_6 15.4%.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import trio

from katydid import client
from katydid.audio import decode_container
from katydid.evaluation import Clip, read_manifest, word_errors
from katydid_worker.speech import Span, SpeechDetector
from tests.integration.stack import Stack, http_get, wait_until

pytestmark = pytest.mark.integration

# whisper.cpp on each whole file pools 3-4% on these (tiny.en q8_0); the floor of the issue is
# direct + 0.3 points pooled, measured by the bench (`nox -s bench -- --long`). Here a margin
# for other hosts, still far below what a lost passage costs (a mix missing one of its ten
# speakers is at 10% or more).
MAX_POOLED_WER = 0.06
MAX_FILE_WER = 0.09
MAX_SILENT_SPEECH_S = 2.0  # no stretch of speech this long without text


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("long"), model_dir, workers=2) as s:
        wait_until(lambda: http_get(s.metrics_url + "/readyz")[0] == 200, 30, "ready")
        yield s


@pytest.fixture(scope="module")
def mixes(speech_dir: Path) -> list[Clip]:
    return read_manifest(speech_dir / "mixes.tsv")


@pytest.fixture(scope="module")
def speech(mixes: list[Clip]) -> dict[str, list[Span]]:
    """Where each mix has speech, by the engine's own voice activity detector."""
    detector = SpeechDetector()
    return {
        c.name: detector.spans(decode_container(c.path, max_audio_s=600, max_bytes=1 << 28))
        for c in mixes
    }


def _longest_silent_speech_s(spans: list[Span], segments: list[tuple[float, float]]) -> float:
    """The longest run of speech (spans joined across pauses under 1 s) that no segment
    touches, padded by 0.5 s for whisper's rough segment times."""
    covers = sorted((a - 0.5, b + 0.5) for a, b in segments)
    worst = run = 0.0
    last_end = -1.0
    for span in spans:
        hit = any(a < span.end_s and b > span.start_s for a, b in covers)
        if hit:
            run = 0.0
        else:
            run = (run if span.start_s - last_end < 1.0 else 0.0) + span.end_s - span.start_s
            worst = max(worst, run)
        last_end = span.end_s
    return worst


def _check(mixes: list[Clip], texts: dict[str, str]) -> None:
    scores = {c.name: word_errors(c.reference, texts[c.name]) for c in mixes}
    pooled = sum(e for e, _ in scores.values()) / sum(w for _, w in scores.values())
    per_file = {name: round(e / w, 3) for name, (e, w) in scores.items()}
    assert pooled <= MAX_POOLED_WER, per_file
    assert max(per_file.values()) <= MAX_FILE_WER, per_file


async def test_every_mix_over_the_websocket_keeps_every_passage(
    stack: Stack, mixes: list[Clip], speech: dict[str, list[Span]]
) -> None:
    results: dict[str, client.SessionResult] = {}

    async def one(clip: Clip) -> None:
        res = await client.transcribe(
            stack.url, clip.path.read_bytes(), fmt="wav", frame_bytes=65_536
        )
        assert res.done is not None, (clip.name, res.events)
        results[clip.name] = res

    async with trio.open_nursery() as nursery:
        for clip in mixes:
            nursery.start_soon(one, clip)
    _check(mixes, {name: r.text for name, r in results.items()})
    for clip in mixes:
        res = results[clip.name]
        done: dict[str, Any] = res.done or {}
        assert done["failed_chunks"] == 0
        # What the engine could not get text for is said; these files have none.
        assert done["uncovered_s"] == 0, done["uncovered"]
        segments = [(s["start_s"], s["end_s"]) for f in res.finals for s in f["segments"]]
        silent = _longest_silent_speech_s(speech[clip.name], segments)
        assert silent < MAX_SILENT_SPEECH_S, (clip.name, silent)
        starts = [f["start_s"] for f in res.finals]
        assert starts == sorted(starts)


def test_every_mix_through_the_openai_door(stack: Stack, mixes: list[Clip]) -> None:
    sdk: Any = openai.OpenAI(base_url=stack.metrics_url + "/v1", api_key="unused", max_retries=0)
    texts = {}
    with sdk:  # closes its connections
        for clip in mixes:
            with clip.path.open("rb") as f:
                out = sdk.audio.transcriptions.create(
                    model="whisper-1", file=f, response_format="verbose_json", timeout=600
                )
            assert out.duration == pytest.approx(clip.duration_s, abs=0.1)
            texts[clip.name] = out.text
    _check(mixes, texts)
