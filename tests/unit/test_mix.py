"""The benchmark mix: whole clips, long recordings cut each way, buckets and pooled scoring."""

from __future__ import annotations

import numpy as np
import pytest

from tests.bench.mix import BUCKETS, bucket_of, build, group_references, pooled_errors
from tests.signals import vowel

SR = 16_000


@pytest.mark.parametrize(
    ("seconds", "bucket"), [(2.0, "<=5 s"), (5.0, "<=5 s"), (5.1, "5-12 s"), (29.9, "12-30 s")]
)
def test_buckets(seconds: float, bucket: str) -> None:
    assert bucket_of(seconds) == bucket
    assert [b[0] for b in BUCKETS] == ["<=5 s", "5-12 s", "12-30 s"]


def test_long_recordings_are_cut_both_ways_and_scored_joined() -> None:
    sentence = np.concatenate([vowel(3.0), np.zeros(int(0.6 * SR), np.float32)])
    long = np.tile(sentence, 20)  # 72 s: 3 s sentences with 0.6 s pauses
    source = [("short.wav", vowel(4.0), "a b"), ("long.wav", long, "x y z")]
    mix = build(source)
    whole = [m for m in mix if m.reference is not None]
    assert [m.name for m in whole] == ["short.wav"]
    pieces = [m for m in mix if m.reference is None]
    groups = {m.group for m in pieces}
    assert len(groups) == 2
    for group in groups:
        cut = [m for m in pieces if m.group == group]
        assert sum(m.audio.size for m in cut) == long.size  # each cut covers the recording once
        assert all(m.duration_s <= 30.0 + 1e-6 for m in cut)
    assert {m.bucket for m in pieces} >= {"<=5 s", "12-30 s"}
    refs = group_references(source, mix)
    texts = ["a b" if m.reference else "" for m in mix]
    # Each cut's first piece says the recording's words, the rest nothing: no errors at all.
    seen: set[str] = set()
    for i, m in enumerate(mix):
        if m.reference is None and m.group not in seen:
            texts[i] = "x y z"
            seen.add(m.group)
    assert pooled_errors(mix, texts, refs) == (0, 2 + 3 + 3)
