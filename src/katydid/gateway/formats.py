"""A finished session's transcript in the OpenAI API's response formats (json, text, srt, vtt,
verbose_json). Pure functions of the finals a session sent."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from katydid.gateway.events import Final

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


def full_text(finals: Sequence[Final]) -> str:
    return " ".join(f.text.strip() for f in finals if f.text.strip())


def _segments(finals: Sequence[Final]) -> list[dict[str, Any]]:
    out = []
    for final in finals:
        for seg in final.segments:
            text = str(seg.get("text", "")).strip()
            if text:
                out.append(
                    {"start": float(seg["start_s"]), "end": float(seg["end_s"]), "text": text}
                    | ({"words": seg["words"]} if seg.get("words") else {})
                )
    return out


def _clock(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def render(
    fmt: str,
    finals: Sequence[Final],
    *,
    task: str,
    duration_s: float,
    words: bool,
) -> tuple[str, str]:
    """``(body, content type)`` of the transcript in ``fmt`` (one of ``RESPONSE_FORMATS``)."""
    text = full_text(finals)
    segs = _segments(finals)
    if fmt == "text":
        return text + "\n", "text/plain; charset=utf-8"
    if fmt == "srt":
        blocks = [
            f"{i}\n{_clock(s['start'], ',')} --> {_clock(s['end'], ',')}\n{s['text']}\n"
            for i, s in enumerate(segs, 1)
        ]
        return "\n".join(blocks), "text/plain; charset=utf-8"
    if fmt == "vtt":
        blocks = [
            f"{_clock(s['start'], '.')} --> {_clock(s['end'], '.')}\n{s['text']}\n" for s in segs
        ]
        return "WEBVTT\n\n" + "\n".join(blocks), "text/vtt; charset=utf-8"
    if fmt == "verbose_json":
        languages = [f.language for f in finals if f.language]
        body: dict[str, Any] = {
            "task": task,
            "language": languages[0] if languages else "",
            "duration": round(duration_s, 3),
            "text": text,
            "segments": [
                {
                    "id": i,
                    "seek": 0,
                    "start": s["start"],
                    "end": s["end"],
                    "text": s["text"],
                    # What whisper.cpp does not report per segment here; present because
                    # clients of this format read them.
                    "tokens": [],
                    "temperature": 0.0,
                    "avg_logprob": 0.0,
                    "compression_ratio": 0.0,
                    "no_speech_prob": 0.0,
                }
                for i, s in enumerate(segs)
            ],
        }
        if words:
            body["words"] = [
                {"word": w["word"], "start": w["start_s"], "end": w["end_s"]}
                for s in segs
                for w in s.get("words", ())
            ]
        return json.dumps(body, ensure_ascii=False), "application/json"
    return json.dumps({"text": text}, ensure_ascii=False), "application/json"
