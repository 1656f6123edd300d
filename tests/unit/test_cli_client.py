"""`katydid transcribe --url`: what it says when a session ends without its transcript."""

from __future__ import annotations

import io
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from katydid import cli_client, client


def _wav(path: Path) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
        w.writeframes(b"\0\0" * 16_000)
    return path


def _final(seq: int, start: float, end: float, text: str) -> dict[str, Any]:
    segment = {"start_s": start, "end_s": end, "text": text}
    return {"type": "final", "seq": seq, "start_s": start, "end_s": end, "text": text,
            "segments": [segment]}  # fmt: skip


@pytest.mark.parametrize("out_format", [None, "srt"])
def test_a_connection_cut_off_is_said_and_what_came_is_kept(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    out_format: str | None,
) -> None:
    # The gateway killed after two finals: status 1 and nothing on stderr; with --format, the
    # two finals were thrown away too.
    async def cut_off(*_: object, **kwargs: Any) -> client.SessionResult:
        events = [{"type": "ready"}, _final(0, 0.0, 2.0, "first"), _final(1, 2.5, 4.0, "second")]
        for event in events:
            kwargs["on_event"](event)
        return client.SessionResult("s", events, close_code=1006)

    monkeypatch.setattr(client, "transcribe", cut_off)
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    wav = _wav(tmp_path / "a.wav")
    code = cli_client.transcribe_remote(
        [wav], "ws://127.0.0.1:9", realtime=False, as_json=False, out_format=out_format
    )
    err, out = stderr.getvalue(), capsys.readouterr().out
    assert code == 1
    assert err == (
        f"katydid: {wav}: the connection ended before the transcript did (close code 1006)"
        " after 2 final(s)\n"
    )
    if out_format is None:
        assert out == "first\nsecond\n"  # as they came
    else:
        assert "00:00:02,500 --> 00:00:04,000\nsecond" in out
        assert out.startswith("1\n00:00:00,000 --> 00:00:02,000\nfirst")


def test_an_error_the_server_sent_is_not_said_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(*_: object, **kwargs: Any) -> client.SessionResult:
        error = {"type": "error", "code": "timeout", "message": "results not complete"}
        kwargs["on_event"](error)
        return client.SessionResult("s", [error], close_code=4008)

    monkeypatch.setattr(client, "transcribe", refused)
    stderr = io.StringIO()
    monkeypatch.setattr("sys.stderr", stderr)
    wav = _wav(tmp_path / "a.wav")
    assert cli_client.transcribe_remote([wav], "ws://x:9", realtime=False, as_json=False) == 1
    assert stderr.getvalue() == f"katydid: {wav}: timeout: results not complete\n"


def test_several_files_written_apart_with_output_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # `--format srt a.wav b.wav` printed two SRTs back to back (numbering restarting): one bad
    # SRT. With --output-dir each is a file of its own.
    async def whole(*_: object, **__: Any) -> client.SessionResult:
        done = {"type": "done", "audio_s": 2.0}
        return client.SessionResult("s", [_final(0, 0.0, 2.0, "hello"), done])

    monkeypatch.setattr(client, "transcribe", whole)
    a, b = _wav(tmp_path / "a.wav"), _wav(tmp_path / "b.wav")
    out_dir = tmp_path / "out"
    code = cli_client.transcribe_remote(
        [a, b], "ws://x:9", realtime=False, as_json=False, out_format="srt", output_dir=out_dir
    )
    assert code == 0
    assert capsys.readouterr().out == ""
    for name in ("a.srt", "b.srt"):
        assert (out_dir / name).read_text() == "1\n00:00:00,000 --> 00:00:02,000\nhello\n"


class _Terminal(io.StringIO):
    """Both output streams on one terminal, as a user sees it: ``\\r`` returns to the line's
    start, ``ESC [ K`` erases to its end, ``\\n`` opens a new line, other text overwrites."""

    def screen(self) -> list[str]:
        lines, row, col = [""], 0, 0
        text = self.getvalue()
        i = 0
        while i < len(text):
            if text.startswith("\x1b[K", i):
                lines[row] = lines[row][:col]
                i += 3
                continue
            c = text[i]
            if c == "\r":
                col = 0
            elif c == "\n":
                lines.append("")
                row, col = row + 1, 0
            else:
                line = lines[row].ljust(col)
                lines[row] = line[:col] + c + line[col + 1 :]
                col += 1
            i += 1
        return lines


def test_the_status_line_leaves_nothing_behind() -> None:
    from katydid.cli_client import StatusLine

    term = _Terminal()
    status = StatusLine(term)
    status.show("queued: position 12, ETA 14.2 s")
    status.show("queued: position 0, ETA 0.4 s")  # shorter: the rest must go
    status.clear()
    term.write("Let the forms of printed letters be plain.\n")  # a final, on stdout
    status.show("transcribed: 115 of 115 s of audio")
    status.show("transcribed: 9 of 115 s of audio")
    status.clear()
    assert term.screen() == ["Let the forms of printed letters be plain.", ""]
    StatusLine(None).show("not a terminal: nothing drawn")


def test_a_file_says_how_long_it_is(tmp_path: Path) -> None:
    import soundfile as sf

    from katydid.cli_client import audio_seconds

    buf = io.BytesIO()
    sf.write(buf, np.zeros(16000 * 3, dtype=np.float32), 16000, format="WAV")
    assert audio_seconds(buf.getvalue(), "wav") == 3.0
    assert audio_seconds(b"\0\0" * 8000, "pcm_s16le") == 0.5
    assert audio_seconds(b"not audio", "mp3") is None
