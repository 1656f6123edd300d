"""The one result a job gets (``answer``): a transcript in session time, or an error."""

from __future__ import annotations

from katydid.messages import Job, JobResult, ResultError, ResultSegment, ResultWord
from katydid_worker.transcript import Transcript


def answer(
    job: Job,
    worker: str,
    queue_s: float,
    *,
    error: tuple[ResultError, str] | None = None,
    audio_s: float = 0.0,
    compute_s: float = 0.0,
    text: str = "",
    segments: tuple[ResultSegment, ...] = (),
    language: str | None = None,
    uncovered: tuple[tuple[float, float], ...] = (),
) -> JobResult:
    """The one result a job gets: a transcript, or ``error`` = (code, message)."""
    return JobResult(
        job=job.job_id,
        session=job.session_id,
        seq=job.seq,
        kind=job.options.kind,
        text=text,
        segments=segments,
        language=language or job.options.language,
        audio_s=audio_s,
        compute_s=compute_s,
        queue_s=queue_s,
        worker=worker,
        error={"code": error[0].value, "message": error[1]} if error else None,
        token=job.token,
        uncovered=uncovered,
    )


def result_segments(tr: Transcript, offset_s: float) -> tuple[ResultSegment, ...]:
    """The transcript's segments (and words) in session time."""
    return tuple(
        ResultSegment(
            round(s.start_s + offset_s, 2),
            round(s.end_s + offset_s, 2),
            s.text,
            tuple(
                ResultWord(w.text, round(w.start_s + offset_s, 2), round(w.end_s + offset_s, 2))
                for w in s.words
            ),
        )
        for s in tr.segments
    )
