"""`katydid transcribe --url`: what it says when a session ends without its transcript."""

from __future__ import annotations

import io
import wave
from pathlib import Path
from typing import Any

import pytest

from katydid import cli_remote, client


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
    code = cli_remote.transcribe_remote(
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
    assert cli_remote.transcribe_remote([wav], "ws://x:9", realtime=False, as_json=False) == 1
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
    code = cli_remote.transcribe_remote(
        [a, b], "ws://x:9", realtime=False, as_json=False, out_format="srt", output_dir=out_dir
    )
    assert code == 0
    assert capsys.readouterr().out == ""
    for name in ("a.srt", "b.srt"):
        assert (out_dir / name).read_text() == "1\n00:00:00,000 --> 00:00:02,000\nhello\n"
