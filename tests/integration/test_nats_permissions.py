"""NATS with credentials and per-role permissions, as infra/systemd/katydid-accounts.conf sets
them: the gateway and a worker, each with its role's user, serve a session end to end; a worker's
credentials cannot publish a job; no credentials, no connection; a worker reads a session's
record and nothing else of the KV buckets or streams. And the embedded server of `katydid serve`
makes its own."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js.api import ConsumerConfig, SubjectTransform
from websockets.sync.client import connect

from katydid.bus.accounts import accounts_config, worker_inbox_prefix
from katydid.evaluation import Clip, read_manifest, wer
from katydid.messages import STREAM, consumer_name, lane_subject
from katydid.session_record import ATTACHED, RESULTS_STREAM, SESSIONS_BUCKET, SessionRecord
from katydid_worker.liveness import Liveness, SessionLiveness, direct_get_subject
from tests.integration.stack import INFRA, Stack, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("nats-auth"), model_dir, workers=1, nats_accounts=True) as s:
        yield s


@pytest.fixture(scope="module")
def jfk(speech_dir: Path) -> Clip:
    return next(c for c in read_manifest(speech_dir / "manifest.tsv") if c.name == "jfk.wav")


def test_the_infra_file_is_what_the_code_renders() -> None:
    assert (INFRA / "systemd" / "katydid-accounts.conf").read_text() == accounts_config()


def test_gateway_and_worker_serve_with_their_roles(
    stack: Stack, jfk: Clip, speech_dir: Path
) -> None:
    clips = read_manifest(speech_dir / "manifest.tsv")
    long_clip = next(c for c in clips if c.path.parent.name == "long")
    finals = []
    with connect(stack.url, max_size=2**22) as ws:
        ws.send(json.dumps({"type": "start", "format": "wav"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        ws.send(jfk.path.read_bytes())
        ws.send(json.dumps({"type": "stop"}))
        while (event := json.loads(ws.recv(timeout=120)))["type"] != "done":
            assert event["type"] != "error", event
            finals.append(event.get("text", ""))
    assert wer(jfk.reference, " ".join(finals)) <= 0.05
    # A client that leaves with jobs queued: the gateway deletes them and announces the cancel
    # (the stream API and the cancel subject, as the gateway's role).
    with connect(stack.url, max_size=2**22) as ws:
        ws.send(json.dumps({"type": "start", "format": "wav"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "ready"
        data = long_clip.path.read_bytes()
        for i in range(0, len(data), 512 * 1024):  # frames under max_frame_bytes
            ws.send(data[i : i + 512 * 1024])
        ws.send(json.dumps({"type": "stop"}))
        while json.loads(ws.recv(timeout=120))["type"] != "final":
            pass
    wait_until(lambda: stream_messages_as_admin(stack) == 0, 30, "the stream to empty")
    left = [e for e in stack.log_events("gateway") if e.get("event") == "session"][-1]
    assert left["outcome"] == "client_gone"
    assert left["cancelled_jobs"] >= 1
    for name in ("gateway", "worker0", "nats"):
        assert "violation" not in stack.log(name).lower(), name
    # Each session's log line names the worker identities that answered it.
    sessions = [e for e in stack.log_events("gateway") if e.get("event") == "session"]
    assert sessions[0]["answered_by"] == ["worker"], sessions[0]


def stream_messages_as_admin(stack: Stack) -> int:
    async def count() -> int:
        nc = await nats.connect(stack.nats_url, user="admin", password=stack.passwords["admin"])
        try:
            return int((await nc.jetstream().stream_info(STREAM)).state.messages)
        finally:
            await nc.close()

    return asyncio.run(count())


async def _as_worker(stack: Stack) -> tuple[Any, list[str]]:
    """A NATS connection with the worker role's credentials, on the only inboxes it may hear,
    and the errors the server sends it (lower case), as they come."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc).lower())

    nc = await nats.connect(
        stack.nats_url,
        user="worker",
        password=stack.passwords["worker"],
        error_cb=on_error,
        allow_reconnect=False,
        inbox_prefix=worker_inbox_prefix("worker"),
    )
    return nc, errors


def test_a_worker_cannot_publish_jobs_and_strangers_cannot_connect(stack: Stack) -> None:
    async def go() -> dict[str, Any]:
        nc, errors = await _as_worker(stack)
        try:
            js = nc.jetstream()
            before = (await js.stream_info(STREAM)).state.messages
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await js.publish(lane_subject("tiny.en-q8_0", "interactive"), b"\0\0", timeout=2)
            # Nor by the back door: a stream whose subjects (and a transform) turn another
            # subject into a job subject.
            config = (await js.stream_info(STREAM)).config
            config.subjects = [*(config.subjects or []), "katydid.results.evil.>"]
            config.subject_transform = SubjectTransform(
                src="katydid.results.evil.>", dest="katydid.jobs.>"
            )
            with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
                await nc.jetstream(timeout=2).update_stream(config)
            await nc.flush()
            assert (await js.stream_info(STREAM)).config.subject_transform is None
            after = (await js.stream_info(STREAM)).state.messages
        finally:
            await nc.close()
        return {"before": before, "after": after, "errors": errors}

    out = asyncio.run(go())
    assert out["after"] == out["before"]
    assert any("permissions violation" in e.lower() for e in out["errors"]), out["errors"]
    # A client without credentials, in NATS's own words (by hand: nats-py leaves the socket of
    # a refused connection to the garbage collector).
    host, port = stack.nats_url.removeprefix("nats://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        assert raw.recv(4096).startswith(b"INFO ")
        raw.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        answer = b""
        while b"\r\n" not in answer and (chunk := raw.recv(4096)):
            answer += chunk
    assert answer.startswith(b"-ERR 'Authorization Violation'"), answer


def test_a_worker_cannot_change_consumers_nor_hear_other_inboxes(stack: Stack) -> None:
    # The attacks of a worker's credentials: a consumer's filter or ack bounds changed stalled
    # every session; subscribed to _INBOX.>, it heard every other worker's jobs (audio,
    # prompts, tokens) and the gateway's API answers.
    name = consumer_name("tiny.en-q8_0", "interactive")

    async def go() -> dict[str, Any]:
        nc, errors = await _as_worker(stack)
        try:
            js = nc.jetstream(timeout=2)
            before = (await js.consumer_info(STREAM, name)).config
            changed = dataclasses.replace(
                before, filter_subject="katydid.jobs.nobody.interactive", max_ack_pending=1
            )
            refused = (nats.errors.TimeoutError, nats.errors.NoRespondersError, TimeoutError)
            with pytest.raises(refused):
                await js.add_consumer(STREAM, changed)
            with pytest.raises(refused):
                await js.add_consumer(STREAM, ConsumerConfig(durable_name="mine"))
            after = (await js.consumer_info(STREAM, name)).config
            for subject in ("_INBOX.>", f"{worker_inbox_prefix('worker0')}.>", ">"):
                await nc.subscribe(subject)
            # Nor answer under another worker's name (the gateway logs who answered), in
            # either shape of a results subject (<gateway>.<session>.<user> now).
            await nc.publish("katydid.results.g1.worker0", b"{}")
            await nc.publish(f"katydid.results.g1.{'ab' * 16}.worker0", b"{}")
            await nc.flush()
            await asyncio.sleep(0.5)  # the server's -ERR for each arrives after the PONG
        finally:
            await nc.close()
        return {"before": before, "after": after, "errors": errors}

    out = asyncio.run(go())
    assert out["after"].filter_subject == out["before"].filter_subject
    assert out["after"].max_ack_pending == out["before"].max_ack_pending
    for subject in ("katydid.results.g1.worker0", f"katydid.results.g1.{'ab' * 16}.worker0"):
        assert any(
            f'permissions violation for publish to "{subject}"' in e for e in out["errors"]
        ), (subject, out["errors"])
    violations = [e for e in out["errors"] if "permissions violation for subscription" in e]
    for subject in ("_inbox.>", "_inbox_w.worker0.>", '">"'):
        assert any(subject.strip('"') in e for e in violations), (subject, out["errors"])
    # The real worker, on the same user, serves on (its inbox is its own prefix).
    assert "violation" not in stack.log("worker0").lower()


def test_a_worker_reads_one_session_record_and_nothing_else(stack: Stack) -> None:
    """A worker's one KV call: the direct get of a session's record (to skip jobs nobody will
    read); not a write to the bucket, not a get by sequence, not another stream's messages
    (jobs, stored results, another bucket)."""
    session, other = "ab" * 16, "cd" * 16
    record = SessionRecord(session, ATTACHED, "g1", "tiny.en-q8_0", {}).to_json()

    async def as_admin() -> None:
        nc = await nats.connect(stack.nats_url, user="admin", password=stack.passwords["admin"])
        try:
            js = nc.jetstream()
            # As a gateway makes it (a resuming gateway may have made it already: made again,
            # with direct gets, which workers' reads need).
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_key_value(SESSIONS_BUCKET)
            await js.create_key_value(bucket=SESSIONS_BUCKET, history=1, ttl=120, direct=True)
        finally:
            await nc.close()

    async def as_gateway() -> None:  # the gateway role writes records
        nc = await nats.connect(stack.nats_url, user="gateway", password=stack.passwords["gateway"])
        try:
            await (await nc.jetstream().key_value(SESSIONS_BUCKET)).put(session, record)
        finally:
            await nc.close()

    async def as_worker() -> dict[str, Any]:
        nc, errors = await _as_worker(stack)
        refused = (nats.errors.TimeoutError, nats.errors.NoRespondersError)
        out: dict[str, Any] = {"errors": errors, "denied": []}
        try:
            got = await nc.request(direct_get_subject(session), b"", timeout=2)
            out["got"] = (got.headers or {}).get("Status"), got.data
            liveness = SessionLiveness(lambda s, t: nc.request(s, b"", timeout=t), 1.0)
            out["live"] = (await liveness.check(session)).liveness
            out["orphaned"] = (await liveness.check(other)).liveness
            # Its own results, in the new shape, go through.
            await nc.publish(f"katydid.results.g1.{session}.worker", b"{}")
            for subject, body in (
                (f"$JS.API.DIRECT.GET.KV_{SESSIONS_BUCKET}", b'{"seq":1}'),
                (f"$JS.API.STREAM.MSG.GET.KV_{SESSIONS_BUCKET}", b'{"seq":1}'),
                (f"$JS.API.DIRECT.GET.{STREAM}", b'{"seq":1}'),
                (f"$JS.API.STREAM.MSG.GET.{STREAM}", b'{"seq":1}'),
                (f"$JS.API.DIRECT.GET.{RESULTS_STREAM}.katydid.results.g1.{session}.w", b""),
                ("$JS.API.DIRECT.GET.KV_KATYDID_GATEWAYS.$KV.KATYDID_GATEWAYS.secret", b""),
                (f"$JS.API.STREAM.INFO.KV_{SESSIONS_BUCKET}", b""),
            ):
                try:
                    await nc.request(subject, body, timeout=0.5)
                except refused:
                    out["denied"].append(subject)
            with pytest.raises(refused):  # a put, and a delete (a marker), of a record
                await nc.jetstream(timeout=0.5).publish(f"$KV.{SESSIONS_BUCKET}.{session}", b"x")
            await nc.publish(
                f"$KV.{SESSIONS_BUCKET}.{session}", b"", headers={"KV-Operation": "DEL"}
            )
            await nc.flush()
            await asyncio.sleep(0.5)  # the server's -ERR for each arrives after the PONG
        finally:
            await nc.close()
        admin = await nats.connect(stack.nats_url, user="admin", password=stack.passwords["admin"])
        try:
            out["after"] = (
                await (await admin.jetstream().key_value(SESSIONS_BUCKET)).get(session)
            ).value
        finally:
            await admin.close()
        return out

    asyncio.run(as_admin())
    asyncio.run(as_gateway())
    out = asyncio.run(as_worker())
    assert out["got"] == (None, record)
    assert (out["live"], out["orphaned"]) == (Liveness.LIVE, Liveness.ORPHANED)
    assert out["after"] == record  # neither overwritten nor deleted
    assert len(out["denied"]) == 7, out
    violations = [e for e in out["errors"] if "permissions violation for publish" in e]
    for subject in (*out["denied"], f"$KV.{SESSIONS_BUCKET}.{session}"):
        assert any(f'"{subject.lower()}"' in e for e in violations), (subject, out["errors"])
    assert not any(f'"katydid.results.g1.{session}.worker"' in e for e in violations), violations
