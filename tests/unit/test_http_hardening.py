"""The HTTP door against clients that abuse HTTP itself, over real sockets: a request framed two
ways (a smuggling attempt), and uploads trickled a byte at a time (slowloris)."""

from __future__ import annotations

import socket
import time
from typing import Any

import trio

from katydid.bus.memory import MemoryBus
from katydid.config import Config
from katydid.gateway.http import build_app
from katydid.gateway.hub import Hub
from katydid.httpd import serve_http

_SMUGGLED = (
    b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
)
_UPLOAD_HEAD = (
    b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
    b"Content-Type: multipart/form-data; boundary=z\r\nContent-Length: 100000\r\n\r\n"
    b'--z\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
)


def _all_of(s: socket.socket) -> bytes:
    """Everything the server sends until it closes (fails the test after 10 s open)."""
    s.settimeout(10)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def _smuggle(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(_SMUGGLED)
        return _all_of(s)


def _trickle(port: int, every_s: float) -> tuple[bytes, float]:
    """An upload that sends one body byte per ``every_s`` until the server answers."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(_UPLOAD_HEAD)
        s.settimeout(every_s)
        for _ in range(1000):
            try:
                s.sendall(b"a")
                answer = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # reset after the answer
                return b"", time.monotonic() - began
            return answer + _all_of(s), time.monotonic() - began
    raise AssertionError("the trickle was never answered")


def _healthz(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return _all_of(s)


async def _serving(cfg: Config, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    app = build_app(Hub(cfg, bus=MemoryBus()))
    await serve_http(app, "127.0.0.1", 0, task_status=task_status)


async def test_content_length_with_transfer_encoding_is_refused_and_the_connection_closed() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serving, Config())
        answer = await trio.to_thread.run_sync(_smuggle, port)
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b"Transfer-Encoding" in answer
    # The request after it on that connection was not served (before: /healthz answered 200).
    assert answer.count(b"HTTP/1.1 ") == 1, answer


async def test_trickled_uploads_are_let_go_at_the_minimum_rate_and_others_are_served() -> None:
    cfg = Config(upload_min_bytes_per_s=200, upload_rate_grace_s=1.0, idle_timeout_s=60.0)
    results: list[tuple[bytes, float]] = []

    async def trickle(port: int) -> None:
        results.append(await trio.to_thread.run_sync(_trickle, port, 0.25, limiter=limiter))

    limiter = trio.CapacityLimiter(60)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serving, cfg)
        async with trio.open_nursery() as clients:
            for _ in range(50):
                clients.start_soon(trickle, port)
            await trio.sleep(0.5)
            healthy = await trio.to_thread.run_sync(_healthz, port)
        nursery.cancel_scope.cancel()
    assert healthy.startswith(b"HTTP/1.1 200"), healthy
    assert len(results) == 50
    for answer, took in results:
        # At 4 bytes/s against 200: let go once the grace is over (1 s + what was sent / 200),
        # not after idle_timeout_s, which every byte restarted.
        assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer
        assert took < 4.0, took
    assert sum(a.startswith(b"HTTP/1.1 408") for a, _ in results) >= 45


def _raw_post(port: int, content_type: bytes, body: bytes) -> bytes:
    """A POST of ``body`` as ``content_type`` (not a form): everything the server sends until
    it closes."""
    head = (
        (b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Type: " + content_type)
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head + body)
        s.settimeout(10)
        answer = s.recv(65536)
        return answer + _all_of(s)


async def test_a_post_that_is_not_a_form_is_refused_with_the_connection_closed_saying_so() -> None:
    # Its body is never read, so the server ends the connection after the answer: the answer
    # must say so (a keep-alive client sent its next request on it and had it cut off).
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serving, Config())
        answers = [
            await trio.to_thread.run_sync(_raw_post, port, kind, b"\x00" * 60_000)
            for kind in (b"audio/wav", b"text/plain")
        ]
        nursery.cancel_scope.cancel()
    for answer in answers:
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 400"), answer[:200]
        assert b"\r\nconnection: close" in head, head
        assert b"bad_message" in answer
        assert b"must be multipart/form-data" in answer
