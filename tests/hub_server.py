"""A stand-in for the Hugging Face hub: a real HTTP server on a free loopback port, in a thread,
serving one file under whisper.cpp's paths (``/ggerganov/whisper.cpp/resolve/main/ggml-NAME.bin``).

It honours ``Range`` requests (206 with ``Content-Range``) and can misbehave on demand: close the
connection after a given byte of the file (``cut_at``, once), or ignore ``Range`` and send the
whole file (``ignore_range``). Every request's path and ``Range`` header is recorded.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFIX = "/ggerganov/whisper.cpp/resolve/main/"


@dataclass
class HubState:
    files: dict[str, bytes]  # ggml-NAME.bin -> content
    cut_at: int | None = None  # close the connection once the file's byte cut_at is reached
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        state = self.server.state
        state.requests.append((self.path, self.headers.get("Range")))
        data = (
            state.files.get(self.path.removeprefix(PREFIX))
            if self.path.startswith(PREFIX)
            else None
        )
        if data is None:
            self.send_error(404, "Entry not found")
            return
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and not state.ignore_range:
            start = int(match[1])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        end = len(data)
        if state.cut_at is not None and start < state.cut_at < end:
            end, state.cut_at = state.cut_at, None  # once
            self.close_connection = True
        view = memoryview(data)
        for pos in range(start, end, 1 << 20):
            self.wfile.write(view[pos : min(pos + (1 << 20), end)])
        if end < len(data):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # the peer sees the body end early


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: HubState


@contextmanager
def hub_server(files: dict[str, bytes]) -> Iterator[tuple[str, HubState]]:
    """``(endpoint URL, state)`` of a server of ``files`` (``{"ggml-x.bin": b"..."}``)."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.state = HubState(files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
