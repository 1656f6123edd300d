"""The OpenAI response formats, from finals as a session sends them."""

from __future__ import annotations

import json

from katydid.gateway.events import Final
from katydid.gateway.formats import render

FINALS = (
    Final(0, 0.0, 2.5, " Hello there.", (
        {"start_s": 0.0, "end_s": 2.5, "text": " Hello there.",
         "words": [{"word": "Hello", "start_s": 0.1, "end_s": 0.6},
                   {"word": "there.", "start_s": 0.7, "end_s": 1.2}]},
    ), language="en"),
    Final(1, 3661.25, 3662.0, "Bye.", ({"start_s": 3661.25, "end_s": 3662.0, "text": "Bye."},),
          language="en"),
)  # fmt: skip


def test_json_and_text() -> None:
    body, kind = render("json", FINALS, task="transcribe", duration_s=3662.0, words=False)
    assert (json.loads(body), kind) == ({"text": "Hello there. Bye."}, "application/json")
    body, kind = render("text", FINALS, task="transcribe", duration_s=3662.0, words=False)
    assert body == "Hello there. Bye.\n"
    assert kind.startswith("text/plain")


def test_srt_and_vtt_clocks() -> None:
    srt, _ = render("srt", FINALS, task="transcribe", duration_s=3662.0, words=False)
    assert srt == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n2\n01:01:01,250 --> 01:01:02,000\nBye.\n"
    )
    vtt, kind = render("vtt", FINALS, task="transcribe", duration_s=3662.0, words=False)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n")
    assert "01:01:01.250 --> 01:01:02.000\nBye.\n" in vtt
    assert kind.startswith("text/vtt")


def test_verbose_json_with_and_without_words() -> None:
    body, _ = render("verbose_json", FINALS, task="translate", duration_s=3662.0, words=True)
    out = json.loads(body)
    assert (out["task"], out["language"], out["duration"]) == ("translate", "en", 3662.0)
    assert [s["id"] for s in out["segments"]] == [0, 1]
    assert out["segments"][1]["start"] == 3661.25
    assert out["words"] == [
        {"word": "Hello", "start": 0.1, "end": 0.6},
        {"word": "there.", "start": 0.7, "end": 1.2},
    ]
    plain, _ = render("verbose_json", FINALS, task="transcribe", duration_s=1.0, words=False)
    assert "words" not in json.loads(plain)
