"""Where ``katydid transcribe --format`` puts a transcript: rendered as the HTTP door renders it
(txt, srt, vtt, json), and printed or written to a file of its own."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from katydid.gateway.events import Final
from katydid.gateway.formats import render


def final_events(finals: list[dict[str, Any]]) -> list[Final]:
    """Finals as the server sent them (JSON) as events, for ``formats.render``."""
    return [
        Final(
            int(f["seq"]),
            float(f["start_s"]),
            float(f["end_s"]),
            str(f["text"]),
            tuple(f.get("segments", ())),
            language=str(f.get("language", "")),
        )
        for f in finals
    ]


def write_formatted(path: Path, body: str, out_format: str, output_dir: Path | None) -> None:
    """``path``'s transcript in ``out_format``: printed, or written to ``output_dir``."""
    if output_dir is None:
        print(body, end="")
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    out = output_dir / f"{path.stem}.{out_format}"
    out.write_text(body, encoding="utf-8")
    print(f"katydid: {path}: wrote {out}", file=sys.stderr)


def formatted(
    out_format: str, finals: list[dict[str, Any]], done: dict[str, Any], options: dict[str, Any]
) -> str:
    fmt = {"txt": "text", "json": "verbose_json"}.get(out_format, out_format)
    body, _ = render(
        fmt,
        final_events(finals),
        task=str(options.get("task", "transcribe")),
        duration_s=float(done.get("audio_s", 0.0)),
        words=bool(options.get("word_timestamps")),
    )
    return body if body.endswith("\n") else body + "\n"
