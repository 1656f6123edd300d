"""``python -m tests.bench latency``: how soon a live speaker's words come back, and what streaming costs
in accuracy.

Each clip is streamed like a microphone (100 ms frames, each sent when its last sample has been
"spoken", i.e. at ``t0 + (k + 1) × 0.1 s``), followed by a pause, one session at a time (an idle
server). Where the speaker stops is found with Silero VAD on the clip (the engine's detector):
spans of speech merged across gaps under ``pause_s`` are utterances; an utterance shorter than
``min_utterance_s`` joins the next one (as the gateway's live chunker does). A final is matched
to the utterance end nearest to its last segment's end; its latency is its arrival minus the
moment that end was spoken. Partials: the gaps between consecutive results (partial or final)
while the speaker talks. WER: the session's finals against the reference, beside the same clip
sent as a file to the same server. ``--streams N`` (``run_concurrent``): N such clients at once,
each streaming every clip back to back from a different one (``stream_orders``), the figures
pooled over every utterance of every stream.

Two doors (``--door``): the native WebSocket (a session per clip: ``start``, 16 kHz PCM frames,
``stop``) and the OpenAI Realtime door (``stream_clip_realtime``: a connection per clip,
``transcription_session.update`` to ``pcm16``, the same audio resampled to 24 kHz in the same
100 ms appends at the same moments, ``input_audio_buffer.commit`` where the native client sends
``stop``). Realtime events are read in the native shape (``realtime_events``): a ``delta`` is a
partial, a ``completed`` a final; as a ``completed`` carries no times, its end of speech is
estimated (the next speech after the previous final's, plus the item's ``usage.seconds``) and
then matched to a pause exactly as a native final's ``end_s`` is.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import statistics
import time
import wave
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import soxr
import trio

from katydid import client
from katydid.audio import float_to_pcm16
from katydid.evaluation import word_errors

FRAME_S = 0.1
SR = 16_000
REALTIME_SR = 24_000  # the Realtime API's pcm16
_DELTA = "conversation.item.input_audio_transcription.delta"
_COMPLETED = "conversation.item.input_audio_transcription.completed"
_FAILED = "conversation.item.input_audio_transcription.failed"
_SAME_SEND_S = 0.05  # a final's own delta comes with its completed, not as a partial


@dataclass(frozen=True, slots=True)
class Utterance:
    start_s: float
    end_s: float


@dataclass(slots=True)
class ClipLatency:
    name: str
    latencies_s: list[float] = field(default_factory=list)  # utterance end → its final
    partial_gaps_s: list[float] = field(default_factory=list)
    unmatched_finals: int = 0
    stream_errors: tuple[int, int] = (0, 0)  # (errors, reference words), streamed
    file_errors: tuple[int, int] = (0, 0)  # the same clip sent as a file
    stream_text: str = ""


def utterances(
    spans: list[tuple[float, float]], *, pause_s: float = 0.5, min_utterance_s: float = 1.0
) -> list[Utterance]:
    """Speech spans → utterances as the live chunker sees them. Pure, for tests."""
    merged: list[list[float]] = []
    for start, end in spans:
        if merged and (
            start - merged[-1][1] < pause_s or merged[-1][1] - merged[-1][0] < min_utterance_s
        ):
            merged[-1][1] = end
        else:
            merged.append([start, end])
    return [Utterance(s, e) for s, e in merged]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values), q))


def _wav(audio: np.ndarray) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(float_to_pcm16(audio))
    return buf.getvalue()


async def stream_clip(
    url: str,
    audio: np.ndarray,
    *,
    pause_after_s: float = 2.0,
    options: dict[str, Any] | None = None,
) -> tuple[list[tuple[float, dict[str, Any]]], float]:
    """Stream ``audio`` and a pause in real time; return ``[(arrival offset s, event)]`` (offsets
    on the stream's clock: 0 = the first sample is spoken) and the stream's length."""
    pcm = float_to_pcm16(np.concatenate([audio, np.zeros(int(pause_after_s * SR), np.float32)]))
    frame_bytes = int(FRAME_S * SR) * 2
    events: list[tuple[float, dict[str, Any]]] = []
    start = {"type": "start", "format": "pcm_s16le", "sample_rate": SR, "partials": True}
    async with client.connect(url) as ws:
        await ws.send_message(json.dumps(start | (options or {})))
        ready = json.loads(await ws.get_message())
        if ready.get("type") != "ready":
            raise client.ClientError("refused", f"the server answered {ready}")
        t0 = trio.current_time()

        async def send() -> None:
            for k, i in enumerate(range(0, len(pcm), frame_bytes)):
                await trio.sleep_until(t0 + (k + 1) * FRAME_S)  # the frame is now spoken
                await ws.send_message(pcm[i : i + frame_bytes])
            await ws.send_message('{"type": "stop"}')

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while True:
                event = json.loads(await ws.get_message())
                events.append((trio.current_time() - t0, event))
                if event.get("type") in ("done", "error"):
                    break
            nursery.cancel_scope.cancel()
    return events, len(pcm) / 2 / SR


def realtime_pieces(audio: np.ndarray, pause_after_s: float) -> list[bytes]:
    """A 16 kHz clip and its pause as the Realtime door's ``pcm16``: 24 kHz s16le in 100 ms
    pieces (the native client's frames, resampled). Pure, for tests."""
    samples = np.concatenate([audio, np.zeros(int(pause_after_s * SR), np.float32)])
    pcm = float_to_pcm16(soxr.resample(samples, SR, REALTIME_SR, quality="HQ"))
    piece = int(FRAME_S * REALTIME_SR) * 2
    return [pcm[i : i + piece] for i in range(0, len(pcm), piece)]


async def stream_clip_realtime(
    url: str, audio: np.ndarray, *, pause_after_s: float = 2.0
) -> tuple[list[tuple[float, dict[str, Any]]], float]:
    """``stream_clip`` through the Realtime door (``url``: ``ws://HOST:HTTP_PORT/v1/realtime?
    intent=transcription``): a connection per clip, ``pcm16`` appends at the native frames'
    moments, ``input_audio_buffer.commit`` where the native client sends ``stop``, then
    ``input_audio_buffer.clear`` (answered after the commit's items are committed); over once
    every item is completed (or failed) or on an ``error``. Returns the Realtime events as they
    came (``realtime_events`` reads them) and the stream's length."""
    pieces = realtime_pieces(audio, pause_after_s)
    events: list[tuple[float, dict[str, Any]]] = []
    update = {
        "type": "transcription_session.update",
        "session": {"input_audio_format": "pcm16", "input_audio_transcription": {"language": "en"}},
    }
    async with client.connect(url) as ws:
        await ws.send_message(json.dumps(update))
        while True:
            answer = json.loads(await ws.get_message())
            if answer.get("type") == "transcription_session.updated":
                break
            if answer.get("type") == "error":
                raise client.ClientError("refused", f"the server answered {answer}")
        t0 = trio.current_time()

        async def send() -> None:
            for k, piece in enumerate(pieces):
                await trio.sleep_until(t0 + (k + 1) * FRAME_S)  # the piece is now spoken
                audio_b64 = base64.b64encode(piece).decode()
                await ws.send_message(
                    json.dumps({"type": "input_audio_buffer.append", "audio": audio_b64})
                )
            await ws.send_message('{"type": "input_audio_buffer.commit"}')
            await ws.send_message('{"type": "input_audio_buffer.clear"}')

        items: set[str] = set()
        answered: set[str] = set()
        cleared = False
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while True:
                event = json.loads(await ws.get_message())
                events.append((trio.current_time() - t0, event))
                kind = event.get("type")
                if kind == "input_audio_buffer.committed":
                    items.add(str(event.get("item_id")))
                elif kind in (_COMPLETED, _FAILED):
                    answered.add(str(event.get("item_id")))
                cleared = cleared or kind == "input_audio_buffer.cleared"
                if kind == "error" or (cleared and items <= answered):
                    break
            nursery.cancel_scope.cancel()
    return events, len(pieces) * FRAME_S


def _match_end(ends: list[float], arrived: float, end: float) -> float | None:
    """The pause a final that ``arrived`` saying its speech ended at ``end`` is timed from:
    the gateway may end an utterance at any pause of ``pause_s``, if it was spoken before the
    final arrived; None if none is within 1.5 s."""
    spoken = [e for e in ends if e < arrived]
    if not spoken:
        return None
    nearest = min(spoken, key=lambda e: abs(e - end))
    return nearest if abs(nearest - end) <= 1.5 else None


def realtime_events(
    events: list[tuple[float, dict[str, Any]]], spans: list[tuple[float, float]]
) -> list[tuple[float, dict[str, Any]]]:
    """A Realtime stream's events in the native shape, for ``score_clip``: a ``delta`` is a
    ``partial`` (but the one sent with its item's ``completed``: that is the final's text); a
    ``completed`` with text is a ``final`` (an empty one, for a committed silence, is no final,
    as the native door sends none), its ``end_s`` estimated: the item starts at the first speech
    after the previous final's end (as matched), and lasts its ``usage.seconds`` (its segments'
    span); a ``failed`` is dropped (the native chunk error has no text either); an ``error`` stays
    one. Pure, for tests."""
    ends = [u.end_s for u in utterances(spans, min_utterance_s=0.0)]
    out: list[tuple[float, dict[str, Any]]] = []
    previous_end = 0.0
    for i, (arrived, event) in enumerate(events):
        kind = event.get("type")
        if kind == _DELTA:
            after = events[i + 1] if i + 1 < len(events) else None
            if (
                after is not None
                and after[1].get("type") == _COMPLETED
                and after[1].get("item_id") == event.get("item_id")
                and after[0] - arrived < _SAME_SEND_S
            ):
                continue
            out.append((arrived, {"type": "partial", "text": str(event.get("delta", ""))}))
        elif kind == _COMPLETED:
            text = str(event.get("transcript", "")).strip()
            if not text:
                continue
            seconds = float((event.get("usage") or {}).get("seconds") or 0.0)
            start = next((max(s, previous_end) for s, e in spans if e > previous_end), previous_end)
            end = start + seconds
            matched = _match_end(ends, arrived, end)
            previous_end = end if matched is None else matched
            out.append((arrived, {"type": "final", "text": text, "end_s": round(end, 3)}))
        elif kind == "error":
            out.append((arrived, {"type": "error", **(event.get("error") or {})}))
    return out


async def stream_door(
    door: str,
    url: str,
    audio: np.ndarray,
    spans: list[tuple[float, float]],
    *,
    pause_after_s: float = 2.0,
) -> list[tuple[float, dict[str, Any]]]:
    """A clip streamed through ``door``; its events in the native shape."""
    if door == "realtime":
        events, _ = await stream_clip_realtime(url, audio, pause_after_s=pause_after_s)
        return realtime_events(events, spans)
    events, _ = await stream_clip(url, audio, pause_after_s=pause_after_s)
    return events


def score_clip(
    name: str,
    reference: str,
    spans: list[tuple[float, float]],
    events: list[tuple[float, dict[str, Any]]],
) -> ClipLatency:
    utts = utterances(spans)
    out = ClipLatency(name)
    ends = [u.end_s for u in utterances(spans, min_utterance_s=0.0)]
    finals = [(t, e) for t, e in events if e.get("type") == "final"]
    results = [(t, e) for t, e in events if e.get("type") in ("final", "partial")]
    for arrived, event in finals:
        if not ends:
            out.unmatched_finals += 1
            continue
        # The gateway may end an utterance at a pause this grouping merged over: any pause of
        # pause_s is a candidate end, if it was spoken before the final arrived.
        nearest = _match_end(ends, arrived, float(event.get("end_s") or 0.0))
        if nearest is None:
            out.unmatched_finals += 1
            continue
        out.latencies_s.append(arrived - nearest)
    for u in utts:
        # Results while the speaker talks (from 1.5 s in: the first partial is due at 1 s of
        # speech and takes a moment): the gaps between them.
        times = [t for t, _ in results if u.start_s + 1.5 <= t <= u.end_s]
        if times:
            marks = [u.start_s + 1.5, *times]
            out.partial_gaps_s += [b - a for a, b in itertools.pairwise(marks)]
            out.partial_gaps_s.append(u.end_s - times[-1])
        elif u.end_s - u.start_s >= 2.5:
            out.partial_gaps_s.append(u.end_s - u.start_s - 1.5)  # none at all: one long gap
    out.stream_text = " ".join(str(e.get("text", "")) for _, e in finals).strip()
    out.stream_errors = word_errors(reference, out.stream_text)
    return out


def run(
    url: str,
    clips: list[tuple[str, np.ndarray, str]],
    *,
    pause_after_s: float = 2.0,
    door: str = "native",
    stream_url: str | None = None,
) -> list[ClipLatency]:
    """Every clip streamed through ``door`` (at ``stream_url``, default ``url``), then sent as a
    file to the native door at ``url``, one session at a time."""
    from katydid_worker.speech import SpeechDetector

    detector = SpeechDetector()
    out: list[ClipLatency] = []
    for name, audio, reference in clips:
        spans = [(s.start_s, s.end_s) for s in detector.spans(audio)]
        stream = partial(stream_door, door, stream_url or url, audio, spans)
        events = trio.run(partial(stream, pause_after_s=pause_after_s))
        scored = score_clip(name, reference, spans, events)
        as_file = trio.run(partial(client.transcribe, url, _wav(audio), fmt="wav"))
        scored.file_errors = word_errors(reference, as_file.text)
        out.append(scored)
        time.sleep(0.5)  # idle between clips
    return out


def stream_orders(clips: int, streams: int) -> list[list[int]]:
    """Which clips each of ``streams`` concurrent streams plays, in order: every stream plays
    every clip once, stream ``i`` starting ``i * clips / streams`` clips in, so that at any moment
    the streams speak different clips (not one clip's pauses in lockstep). Pure, for tests."""
    if clips <= 0 or streams <= 0:
        return []
    return [[(i * clips // streams + k) % clips for k in range(clips)] for i in range(streams)]


async def _streams(
    url: str,
    clips: list[tuple[str, np.ndarray, str]],
    spans: list[list[tuple[float, float]]],
    streams: int,
    pause_after_s: float,
    stagger_s: float,
    door: str,
) -> list[ClipLatency]:
    out: list[ClipLatency] = []

    async def one(i: int, order: list[int]) -> None:
        await trio.sleep(i * stagger_s)  # clients do not all start on the same frame
        for c in order:
            name, audio, reference = clips[c]
            events = await stream_door(door, url, audio, spans[c], pause_after_s=pause_after_s)
            out.append(score_clip(name, reference, spans[c], events))

    async with trio.open_nursery() as nursery:
        for i, order in enumerate(stream_orders(len(clips), streams)):
            nursery.start_soon(one, i, order)
    return out


def run_concurrent(
    url: str,
    clips: list[tuple[str, np.ndarray, str]],
    *,
    streams: int,
    pause_after_s: float = 2.0,
    stagger_s: float = 0.37,
    door: str = "native",
    stream_url: str | None = None,
) -> list[ClipLatency]:
    """``streams`` clients at once, each streaming every clip (a session each) back to back in
    real time with partials (``stream_orders``) through ``door`` (at ``stream_url``, default
    ``url``); then each clip once as a file to the native door at ``url``, one at a time, for
    the WER beside it. One ``ClipLatency`` per streamed clip (``streams`` per clip)."""
    from katydid_worker.speech import SpeechDetector

    detector = SpeechDetector()
    spans = [[(s.start_s, s.end_s) for s in detector.spans(a)] for _, a, _ in clips]
    target = stream_url or url
    out = trio.run(partial(_streams, target, clips, spans, streams, pause_after_s, stagger_s, door))
    file_errors = {}
    for name, audio, reference in clips:
        as_file = trio.run(partial(client.transcribe, url, _wav(audio), fmt="wav"))
        file_errors[name] = word_errors(reference, as_file.text)
    for r in out:
        r.file_errors = file_errors[r.name]
    return out


def report(results: list[ClipLatency]) -> dict[str, Any]:
    lat = [x for r in results for x in r.latencies_s]
    gaps = [x for r in results for x in r.partial_gaps_s]
    words = sum(r.stream_errors[1] for r in results)
    stream_wer = sum(r.stream_errors[0] for r in results) / words if words else 0.0
    file_wer = sum(r.file_errors[0] for r in results) / words if words else 0.0
    return {
        "clips": len(results),
        "finals_matched": len(lat),
        "finals_unmatched": sum(r.unmatched_finals for r in results),
        "end_of_speech_to_final_s": {
            "p50": round(percentile(lat, 50), 3),
            "p90": round(percentile(lat, 90), 3),
            "p99": round(percentile(lat, 99), 3),
            "max": round(max(lat), 3) if lat else None,
        },
        "partial_interval_s": {
            "p50": round(percentile(gaps, 50), 3),
            "p90": round(percentile(gaps, 90), 3),
            "max": round(max(gaps), 3) if gaps else None,
            "mean": round(statistics.fmean(gaps), 3) if gaps else None,
        },
        "wer_streaming": round(100 * stream_wer, 2),
        "wer_file": round(100 * file_wer, 2),
        "wer_points_streaming_minus_file": round(100 * (stream_wer - file_wer), 2),
    }


def markdown(results: list[ClipLatency], summary: dict[str, Any]) -> str:
    lines = [
        "| clip | finals | end of speech → final s (each) | longest gap between results s | WER stream | WER file |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        se, sw = r.stream_errors
        fe, _ = r.file_errors
        lines.append(
            f"| {r.name} | {len(r.latencies_s)} | {', '.join(f'{x:.2f}' for x in r.latencies_s)} | "
            f"{max(r.partial_gaps_s, default=0.0):.2f} | {100 * se / max(sw, 1):.1f}% | {100 * fe / max(sw, 1):.1f}% |"
        )
    return "\n".join([*lines, "", *_summary_lines(summary)])


def markdown_streams(results: list[ClipLatency], summary: dict[str, Any]) -> str:
    """Concurrent streams: one row per clip over all its streams."""
    lines = [
        "| clip | streamed | finals | end of speech → final s, p50 / max | WER stream | WER file |",
        "|---|---:|---:|---|---:|---:|",
    ]
    by_clip: dict[str, list[ClipLatency]] = {}
    for r in results:
        by_clip.setdefault(r.name, []).append(r)
    for name, rs in by_clip.items():
        lat = [x for r in rs for x in r.latencies_s]
        se, sw = sum(r.stream_errors[0] for r in rs), sum(r.stream_errors[1] for r in rs)
        fe, fw = rs[0].file_errors
        lines.append(
            f"| {name} | {len(rs)} | {len(lat)} | {percentile(lat, 50):.2f} / "
            f"{max(lat, default=float('nan')):.2f} | {100 * se / max(sw, 1):.1f}% | "
            f"{100 * fe / max(fw, 1):.1f}% |"
        )
    return "\n".join([*lines, "", *_summary_lines(summary)])


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    e2f, gap = summary["end_of_speech_to_final_s"], summary["partial_interval_s"]
    return [
        f"end of speech → final: p50 {e2f['p50']} s, p90 {e2f['p90']} s, p99 {e2f['p99']} s "
        f"({summary['finals_matched']} finals, {summary['finals_unmatched']} unmatched)",
        f"gap between results while speaking: p50 {gap['p50']} s, p90 {gap['p90']} s, max {gap['max']} s",
        f"WER streaming {summary['wer_streaming']}% vs file {summary['wer_file']}% "
        f"({summary['wer_points_streaming_minus_file']:+} points)",
    ]
