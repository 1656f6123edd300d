"""The ``katydid`` subcommands that talk to a server or run one (serve, gateway, worker, nats)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import re
import sys
from pathlib import Path
from typing import Any, TextIO

import trio

from katydid import client
from katydid.audio import decode_container, float_to_pcm16, sniff_container
from katydid.config import Config
from katydid.errors import KatydidError
from katydid.evaluation import Clip, Heard
from katydid.gateway.events import Final
from katydid.gateway.formats import render
from katydid.sdnotify import notify

_FILE_FRAME_BYTES = 64 * 1024
_PCM_FRAME_BYTES = 3200  # 100 ms of 16 kHz mono s16le


def file_format(path: Path, data: bytes) -> str:
    fmt = sniff_container(data[:16])
    if fmt is None:
        raise KatydidError("not a WAV, FLAC, OGG or MP3 file")  # the caller names the file
    return fmt


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


def transcribe_remote(
    files: list[Path],
    url: str,
    *,
    realtime: bool,
    as_json: bool,
    options: dict[str, Any] | None = None,
    out_format: str | None = None,
    output_dir: Path | None = None,
) -> int:
    """Stream each file to the gateway and print finals as they arrive (or, with
    ``out_format`` = txt, srt, vtt or json, the whole transcript in that format at the end, or
    written to ``output_dir``/NAME.FORMAT)."""
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

        frame = _PCM_FRAME_BYTES if fmt == "pcm_s16le" else _FILE_FRAME_BYTES
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
                )
            )
        except client.ClientError as exc:
            print(f"katydid: {path}: {exc}", file=sys.stderr)
            failed += 1
            continue
        done = result.done
        if done is None:
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
        return len(data) / 2 / 16_000
    import soundfile as sf

    try:
        return float(sf.info(io.BytesIO(data)).duration)
    except (RuntimeError, TypeError, ValueError, sf.LibsndfileError):
        return None


def _require_nats(cfg: Config) -> None:
    if not cfg.nats_url:
        raise KatydidError(
            "no NATS URL: pass --nats-url or set KATYDID_NATS_URL (or --data-dir: that of a"
            " `katydid serve` on this host)"
        )


async def _gateway_alone(cfg: Config) -> None:
    from katydid.gateway import GatewayService
    from katydid.lifecycle import until_signalled

    gateway = GatewayService(cfg)
    async with trio.open_nursery() as nursery:
        await nursery.start(gateway.run)
        for line in gateway.addresses():
            print(line, flush=True)
        notify("READY=1")
        await until_signalled(gateway.drain, gateway.cut_grace, name="gateway")
        nursery.cancel_scope.cancel()


def _nats_setup(cfg: Config) -> None:
    from katydid.bus.nats_admin import set_up_stream

    print(set_up_stream(cfg))


def embedded_admin(cfg: Config) -> Config:
    """For ``katydid nats status|setup`` on ``katydid serve``'s host: where no NATS URL or no
    credentials are configured, those of serve's embedded NATS, from its data dir (the URL from
    its nats-server.conf, the admin password from its credentials.json). Without them, status
    said "Authorization Violation" to a user who could reach it, and not where they are."""
    nats_dir = cfg.data_dir / "nats"
    changes: dict[str, Any] = {}
    if not cfg.nats_url:
        try:
            conf = (nats_dir / "nats-server.conf").read_text(encoding="utf-8")
        except OSError:
            return cfg
        listen = re.search(r"^listen: (\S+)$", conf, re.M)
        if listen is None:
            return cfg
        changes["nats_url"] = f"nats://{listen.group(1)}"
    if not (cfg.nats_user or cfg.nats_creds_file or cfg.nats_nkey_seed_file):
        try:
            stored = json.loads((nats_dir / "credentials.json").read_text(encoding="utf-8"))
            changes |= {"nats_user": "admin", "nats_password": str(stored["admin"])}
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return dataclasses.replace(cfg, **changes)


def run_server_command(cfg: Config, args: argparse.Namespace) -> int:
    if args.command == "serve":
        from katydid.serve import serve

        trio.run(lambda: serve(cfg, announce=lambda line: print(line, flush=True)))
        return 0
    if args.command == "nats":
        cfg = embedded_admin(cfg)
    _require_nats(cfg)
    if args.command == "gateway":
        trio.run(_gateway_alone, cfg)
    elif args.command == "worker":
        from katydid_worker import models
        from katydid_worker.worker import run_worker

        run_worker(cfg, models.resolve(cfg.model_dir, cfg.model), args.worker_id)
    elif args.nats_command == "status":
        from katydid.bus.nats_admin import queue_status

        status = queue_status(cfg)
        print(json.dumps(status) if args.json else _status_table(status))
    else:
        _nats_setup(cfg)
    return 0


def _status_table(status: dict[str, Any]) -> str:
    """``katydid nats status`` for a terminal: what `nats stream info` and `nats consumer
    report` show, and the workers' heartbeats."""
    st = status["stream"]
    lines = [
        f"stream {st['name']}: {st['messages']} jobs, {st['bytes']} bytes"
        f" (bounds: {st['max_msgs']} jobs, {st['max_bytes']} bytes, {st['max_msg_size']} per job)",
        *([f"stream stores no job now: {st['why']}"] if st.get("stores_jobs") is False else []),
        "",
        f"{'consumer':<36} {'model':<20} {'lane':<12} {'pending':>8} {'in progress':>12}"
        f" {'redelivered':>12}",
    ]
    for c in status["consumers"]:
        lines.append(
            f"{c['name']:<36} {c['model']:<20} {c['lane']:<12} {c['pending']:>8}"
            f" {c['ack_pending']:>12} {c['redelivered']:>12}"
        )
    lines += ["", f"{'worker':<36} {'model':<20} {'busy':<6} {'jobs':>8} {'rtf':>8}"]
    for w in status["workers"]:
        rtf = f"{w['rtf']:.3f}" if isinstance(w.get("rtf"), int | float) else "-"
        lines.append(
            f"{w['id']:<36} {w['model']:<20} {'yes' if w['busy'] else 'no':<6}"
            f" {w['jobs_done']:>8} {rtf:>8}"
        )
    if not status["workers"]:
        lines.append(f"(no heartbeat within {status['listened_s']:.1f} s)")
    return "\n".join(lines)
