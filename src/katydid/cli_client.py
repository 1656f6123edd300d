"""The client side of ``katydid transcribe`` and ``katydid eval --url``: files sent to a running
gateway, what comes back printed as it arrives (or rendered at the end, ``cli_output``)."""

from __future__ import annotations

import functools
import io
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import trio

from katydid import client
from katydid.audio import BYTES_PER_S, decode_container, float_to_pcm16, sniff_container
from katydid.cli_output import formatted, write_formatted
from katydid.errors import KatydidError
from katydid.evaluation import Clip, Heard

_FILE_FRAME_BYTES = 64 * 1024
_PCM_FRAME_BYTES = BYTES_PER_S // 10  # 100 ms of 16 kHz mono s16le


def file_format(path: Path, data: bytes) -> str:
    fmt = sniff_container(data[:16])
    if fmt is None:
        raise KatydidError("not a WAV, FLAC, OGG or MP3 file")  # the caller names the file
    return fmt


def transcribe_remote(
    files: list[Path],
    url: str,
    *,
    realtime: bool,
    as_json: bool,
    options: dict[str, Any] | None = None,
    out_format: str | None = None,
    output_dir: Path | None = None,
    resume: client.ResumeOptions | None = None,
) -> int:
    """Stream each file to the gateway and print finals as they arrive (or, with
    ``out_format`` = txt, srt, vtt or json, the whole transcript in that format at the end, or
    written to ``output_dir``/NAME.FORMAT). A lost connection is resumed (``resume``), said in
    a line on stderr."""
    failed = 0
    tty = sys.stderr.isatty()
    for path in files:
        try:
            data = path.read_bytes()
            fmt = file_format(path, data)
        except OSError as exc:
            print(f"katydid: {path}: cannot read it: {exc.strerror or exc}", file=sys.stderr)
            failed += 1
            continue
        except KatydidError as exc:
            print(f"katydid: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        if realtime:
            # Paced like a microphone: decode here and send 100 ms PCM frames in real time.
            audio = decode_container(data, max_audio_s=4 * 3600, max_bytes=len(data))
            data, fmt = float_to_pcm16(audio), "pcm_s16le"

        status = StatusLine(sys.stderr if tty and not as_json else None)
        seconds = audio_seconds(data, fmt)
        total = f" of {seconds:.0f}" if seconds else ""

        def show(
            event: dict[str, Any],
            path: Path = path,
            status: StatusLine = status,
            total: str = total,
        ) -> None:
            kind = event.get("type")
            if as_json and not out_format:
                print(json.dumps(event, ensure_ascii=False), flush=True)
            elif kind == "final":
                if not out_format:
                    status.clear()  # the text goes on a line of its own
                    print(event.get("text", ""), flush=True)
                status.show(f"transcribed: {event['end_s']:.0f}{total} s of audio")
            elif kind == "queued":
                status.show(f"queued: position {event['position']}, ETA {event['eta_s']} s")
            elif kind == "error":
                status.clear()
                print(
                    f"katydid: {path}: {event.get('code')}: {event.get('message')}", file=sys.stderr
                )
            elif kind == "done":
                status.clear()

        def said(what: str, path: Path = path, status: StatusLine = status) -> None:
            status.clear()
            line = "connection lost, reconnecting…" if what == "reconnecting" else what
            print(f"katydid: {path}: {line}", file=sys.stderr, flush=True)

        frame = _PCM_FRAME_BYTES if fmt == "pcm_s16le" else _FILE_FRAME_BYTES
        reported = False  # the failure was said already
        try:
            result = trio.run(
                functools.partial(
                    client.transcribe,
                    url,
                    data,
                    fmt=fmt,
                    frame_bytes=frame,
                    realtime=realtime,
                    on_event=show,
                    options=options,
                    resume=resume,
                    on_status=said,
                )
            )
        except client.ClientError as exc:
            status.clear()
            print(f"katydid: {path}: {exc}", file=sys.stderr)
            failed += 1
            if exc.result is None or not exc.result.finals:
                continue
            result, reported = exc.result, True  # not resumed: what came is kept (--format)
        done = result.done
        if done is None and not reported:
            failed += 1
            if not any(e.get("type") == "error" for e in result.events):
                # Cut off without a word from the server (it went away, the network did): say
                # so, or the command would end with status 1 and nothing on stderr.
                code = f" (close code {result.close_code})" if result.close_code else ""
                got = f" after {len(result.finals)} final(s)" if result.finals else ""
                print(
                    f"katydid: {path}: the connection ended before the transcript did{code}{got}",
                    file=sys.stderr,
                )
        if out_format and (done is not None or result.finals):
            # What came before a failure is printed too (the status says it is incomplete).
            if tty:
                print(file=sys.stderr)
            end_s = max((float(f.get("end_s", 0.0)) for f in result.finals), default=0.0)
            body = formatted(out_format, result.finals, done or {"audio_s": end_s}, options or {})
            write_formatted(path, body, out_format, output_dir)
    return 1 if failed else 0


def remote_heard(url: str, clip: Clip) -> Heard:
    """Transcribe one evaluation clip through a running server."""
    try:
        data = clip.path.read_bytes()
    except OSError as exc:
        raise KatydidError(f"cannot read it: {exc.strerror or exc}") from None
    fmt = file_format(clip.path, data)
    result = trio.run(lambda: client.transcribe(url, data, fmt=fmt, frame_bytes=_FILE_FRAME_BYTES))
    if result.done is None:
        raise KatydidError(f"session failed: {result.error}")  # evaluate names the clip
    return Heard(result.text, float(result.done["audio_s"]), result.total_s)


class StatusLine:
    """One line of progress on a terminal, redrawn in place: each update returns to the line's
    start and erases it first (shorter text left the end of the longer behind: "...ETA 0.4
    sLet the forms", "115 s of audio s"), and it is erased before other output."""

    _ERASE = "\r\x1b[K"

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream  # None: not a terminal, nothing is drawn
        self.shown = False

    def show(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(self._ERASE + text)
            self.stream.flush()
            self.shown = True

    def clear(self) -> None:
        if self.stream is not None and self.shown:
            self.stream.write(self._ERASE)
            self.stream.flush()
            self.shown = False


def audio_seconds(data: bytes, fmt: str) -> float | None:
    """How long a file's audio is, from its header (None if it does not say)."""
    if fmt == "pcm_s16le":
        return len(data) / BYTES_PER_S
    import soundfile as sf

    try:
        return float(sf.info(io.BytesIO(data)).duration)
    except (RuntimeError, TypeError, ValueError, sf.LibsndfileError):
        return None
