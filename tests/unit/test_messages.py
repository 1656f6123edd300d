"""The gateway↔worker envelope round-trips and rejects malformed input."""

from __future__ import annotations

import pytest

from katydid.errors import MessageError
from katydid.messages import Job, JobOptions, JobResult, ResultSegment


def test_job_headers_round_trip() -> None:
    job = Job(
        "s-3",
        "s",
        3,
        12_500,
        "katydid.results.g1",
        1_900_000_000_000,
        JobOptions("de", True, "hi", "final"),
    )
    headers = job.headers()
    assert headers["Nats-Msg-Id"] == "s-3"
    assert all(isinstance(v, str) for v in headers.values())
    assert Job.from_headers(headers) == job


@pytest.mark.parametrize(
    "broken",
    [
        {"Katydid-Seq": "three"},
        {"Katydid-Options": "{not json"},
        {"Katydid-Options": '{"kind": "maybe"}'},
        {"Katydid-Session": ""},
    ],
)
def test_malformed_jobs_are_message_errors(broken: dict[str, str]) -> None:
    headers = Job("s-3", "s", 3, 0, "r", 1).headers() | broken
    with pytest.raises(MessageError):
        Job.from_headers(headers)
    with pytest.raises(MessageError, match="lacks header"):
        Job.from_headers({})


def test_result_round_trip_and_garbage() -> None:
    r = JobResult(
        "j",
        "s",
        1,
        "final",
        "hello",
        (ResultSegment(1.0, 2.0, "hello"),),
        "en",
        1.0,
        0.2,
        0.1,
        "w",
        None,
    )
    assert JobResult.from_json(r.to_json()) == r
    e = JobResult(
        "j", "s", 1, "final", "", (), "en", 0, 0, 0, "w", {"code": "expired", "message": "late"}
    )
    assert JobResult.from_json(e.to_json()).error == {"code": "expired", "message": "late"}
    for garbage in (b"nope", b"[]", b'{"job": "j"}', b'{"job": "j", "session": "s", "seq": "x"}'):
        with pytest.raises(MessageError):
            JobResult.from_json(garbage)
