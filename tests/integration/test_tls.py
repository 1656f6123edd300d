"""TLS on every listener, with a self-signed CA made for the test (trustme): `wss://` with the
`websockets` client, `https://` with the `openai` SDK, Wyoming over TLS with the `wyoming`
package's event codec, and our own CLI with SSL_CERT_FILE; each verifies the certificate. A
client that does not trust it, or speaks plain TCP to a TLS port, fails alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import trustme
from websockets.sync.client import connect
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import async_read_event, async_write_event

from katydid.audio import decode_container, float_to_pcm16
from katydid.config import Config
from katydid.errors import ConfigError
from katydid.evaluation import Clip, read_manifest, wer
from katydid.tls import server_context
from tests.integration.stack import Stack, free_port, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tls")
    authority = trustme.CA()
    cert = authority.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": root / "ca.pem", "cert": root / "cert.pem", "key": root / "key.pem"}
    authority.cert_pem.write_to_path(str(paths["ca"]))
    with paths["cert"].open("wb") as f:  # the chain: server certificate first
        for pem in cert.cert_chain_pems:
            f.write(pem.bytes())
    cert.private_key_pem.write_to_path(str(paths["key"]))
    return paths


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, ca: dict[str, Path]
) -> Iterator[Stack]:
    wyoming = free_port()
    with Stack(
        tmp_path_factory.mktemp("tls-stack"),
        model_dir,
        workers=1,
        tls_cert_file=ca["cert"],
        tls_key_file=ca["key"],
        wyoming_port=wyoming,
    ) as s:
        s.wyoming_port = wyoming  # type: ignore[attr-defined]
        trusted = ssl.create_default_context(cafile=str(ca["ca"]))
        ready = f"https://127.0.0.1:{s.http_port}/readyz"
        wait_until(lambda: _https_status(ready, trusted) == 200, 30, "ready over https")
        yield s


def _https_status(url: str, context: ssl.SSLContext) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code)
    except urllib.error.URLError:
        return 0  # not listening yet


@pytest.fixture(scope="module")
def jfk(speech_dir: Path) -> Clip:
    return next(c for c in read_manifest(speech_dir / "manifest.tsv") if c.name == "jfk.wav")


def _wss_file(url: str, clip: Clip, context: ssl.SSLContext) -> str:
    finals = []
    with connect(url, ssl=context, max_size=2**22) as ws:
        ws.send(json.dumps({"type": "start", "format": "wav"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        ws.send(clip.path.read_bytes())
        ws.send(json.dumps({"type": "stop"}))
        while (event := json.loads(ws.recv(timeout=120)))["type"] != "done":
            assert event["type"] != "error", event
            if event["type"] == "final":
                finals.append(event["text"])
    return " ".join(finals)


def test_wss_and_https_with_independent_clients(
    stack: Stack, ca: dict[str, Path], jfk: Clip
) -> None:
    trusted = ssl.create_default_context(cafile=str(ca["ca"]))
    url = f"wss://127.0.0.1:{stack.port}"
    # A client that does not trust the certificate, and one that speaks plain WebSocket to the
    # TLS port, fail alone; a trusting client is served after them.
    # (By hand, with sockets this test closes: a failed client connect may leave its socket
    # to the garbage collector.)
    raw = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
    untrusting = ssl.create_default_context().wrap_socket(  # takes raw's descriptor over
        raw, server_hostname="127.0.0.1", do_handshake_on_connect=False
    )
    with untrusting, pytest.raises(ssl.SSLCertVerificationError):
        untrusting.do_handshake()
    with socket.create_connection(("127.0.0.1", stack.port), timeout=10) as plain:
        plain.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := plain.recv(4096):
                answer += chunk
        assert b"101" not in answer  # no WebSocket without TLS on a TLS port
    assert wer(jfk.reference, _wss_file(url, jfk, trusted)) <= 0.05
    with (
        openai.OpenAI(
            base_url=f"https://127.0.0.1:{stack.http_port}/v1",
            api_key="none",
            max_retries=0,
            http_client=openai.DefaultHttpxClient(verify=trusted),
        ) as client,
        jfk.path.open("rb") as f,
    ):
        out = client.audio.transcriptions.create(model="whisper-1", file=f)
    assert wer(jfk.reference, out.text) <= 0.05


def test_wyoming_over_tls(stack: Stack, ca: dict[str, Path], jfk: Clip) -> None:
    pcm = float_to_pcm16(decode_container(jfk.path, max_audio_s=60, max_bytes=10**8))
    trusted = ssl.create_default_context(cafile=str(ca["ca"]))
    port = stack.wyoming_port  # type: ignore[attr-defined]

    async def transcribe() -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=trusted)
        try:
            await async_write_event(Transcribe(language="en").event(), writer)
            await async_write_event(AudioStart(rate=16000, width=2, channels=1).event(), writer)
            for i in range(0, len(pcm), 3200):
                chunk = AudioChunk(rate=16000, width=2, channels=1, audio=pcm[i : i + 3200])
                await async_write_event(chunk.event(), writer)
            await async_write_event(AudioStop().event(), writer)
            while True:
                event = await asyncio.wait_for(async_read_event(reader), 120)
                assert event is not None
                assert event.type != "error", event.data
                if Transcript.is_type(event.type):
                    return Transcript.from_event(event).text
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()  # an SSL transport needs the loop to finish closing

    assert wer(jfk.reference, asyncio.run(transcribe())) <= 0.1


def test_our_cli_trusts_what_ssl_cert_file_names(
    stack: Stack, ca: dict[str, Path], jfk: Clip
) -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "katydid",
            "transcribe",
            "--url",
            f"wss://127.0.0.1:{stack.port}",
            str(jfk.path),
        ],
        capture_output=True,
        text=True,
        env=os.environ | {"SSL_CERT_FILE": str(ca["ca"])},
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    assert wer(jfk.reference, run.stdout) <= 0.05


def test_a_certificate_that_cannot_be_used_is_named_at_start(
    tmp_path: Path, ca: dict[str, Path]
) -> None:
    def context(**kw: Any) -> ssl.SSLContext | None:
        return server_context(Config(**kw))

    assert context() is None
    with pytest.raises(ConfigError, match="both tls_cert_file and tls_key_file"):
        context(tls_cert_file=str(ca["cert"]))
    with pytest.raises(ConfigError, match="no such file"):
        context(tls_cert_file=str(tmp_path / "nope.pem"), tls_key_file=str(ca["key"]))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(ConfigError, match="cannot use certificate"):
        context(tls_cert_file=str(garbage), tls_key_file=str(ca["key"]))
    run = subprocess.run(
        [sys.executable, "-m", "katydid", "gateway", "--nats-url", "nats://127.0.0.1:1"],
        capture_output=True,
        text=True,
        env=os.environ | {"KATYDID_TLS_CERT_FILE": str(garbage), "KATYDID_TLS_KEY_FILE": "x"},
        timeout=60,
    )
    assert run.returncode != 0
    assert "cannot use certificate" in run.stderr or "no such file" in run.stderr
