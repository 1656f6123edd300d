"""Where the engine cuts speech too long for one clip-sized window (pieces.py)."""

from __future__ import annotations

import itertools

import pytest

from katydid_worker.pieces import cut_at_pauses
from katydid_worker.speech import Span


def _spans(*bounds: tuple[float, float]) -> list[Span]:
    return [Span(a, b) for a, b in bounds]


def _tiles(pieces: list[tuple[float, float]], start_s: float, end_s: float) -> bool:
    return (
        pieces[0][0] == start_s
        and pieces[-1][1] == end_s
        and all(a[1] == b[0] for a, b in itertools.pairwise(pieces))
    )


def test_speech_that_fits_is_one_piece() -> None:
    spans = _spans((0.3, 4.0), (4.5, 11.0))
    assert cut_at_pauses(spans, 0.0, 11.3, max_s=11.8, min_s=5.0) == [(0.0, 11.3)]


def test_the_cut_is_in_the_longest_pause_that_leaves_long_enough_pieces() -> None:
    # Pauses at 3.1-3.9 (longest, but it would leave a 3.5 s first piece), 6.0-6.4 and
    # 9.0-9.3: the cut goes in the middle of 6.0-6.4.
    spans = _spans((0.3, 3.1), (3.9, 6.0), (6.4, 9.0), (9.3, 15.0))
    pieces = cut_at_pauses(spans, 0.0, 15.3, max_s=11.8, min_s=5.0)
    assert pieces == [(0.0, 6.2), (6.2, 15.3)]


def test_no_piece_is_longer_than_the_window_where_pauses_allow() -> None:
    # 29 s of speech with a short pause every 2.5 s.
    bounds = [(0.3 + 2.5 * i, 0.3 + 2.5 * i + 2.2) for i in range(12)]
    spans = _spans(*bounds)
    end_s = bounds[-1][1] + 0.3
    pieces = cut_at_pauses(spans, 0.0, end_s, max_s=11.8, min_s=5.0)
    assert _tiles(pieces, 0.0, end_s)
    assert all(b - a <= 11.8 for a, b in pieces)
    assert all(b - a >= 5.0 for a, b in pieces[:-1])
    assert len(pieces) == 3
    # Every cut is in a pause, never inside speech.
    assert all(not any(s.start_s < b < s.end_s for s in spans) for _, b in pieces[:-1])


def test_a_remainder_shorter_than_the_minimum_is_avoided_when_a_pause_allows() -> None:
    # The longest pause (10.5-11.5) would leave 1.8 s; the one at 6.0-6.3 leaves two pieces
    # of at least 5 s.
    spans = _spans((0.2, 6.0), (6.3, 10.5), (11.5, 13.0))
    assert cut_at_pauses(spans, 0.0, 13.3, max_s=11.8, min_s=5.0) == [(0.0, 6.15), (6.15, 13.3)]


def test_an_early_pause_is_used_when_it_is_the_only_one_within_the_window() -> None:
    spans = _spans((0.2, 2.5), (3.0, 13.5))
    assert cut_at_pauses(spans, 0.0, 13.8, max_s=11.8, min_s=5.0) == [(0.0, 2.75), (2.75, 13.8)]


def test_without_a_pause_within_the_window_the_first_one_past_it_is_used() -> None:
    # 14 s without a pause, then a pause and 6 s more: the first piece needs the full window,
    # the second still fits a clip-sized one.
    spans = _spans((0.2, 14.0), (14.6, 20.0))
    pieces = cut_at_pauses(spans, 0.0, 20.3, max_s=11.8, min_s=5.0)
    assert pieces == [(0.0, 14.3), (14.3, 20.3)]


def test_speech_without_any_pause_is_one_piece() -> None:
    spans = _spans((0.3, 25.0))
    assert cut_at_pauses(spans, 0.0, 25.3, max_s=11.8, min_s=5.0) == [(0.0, 25.3)]


def test_times_are_the_clips_own_whatever_the_start() -> None:
    spans = _spans((10.3, 16.0), (16.6, 24.0))
    assert cut_at_pauses(spans, 10.0, 24.3, max_s=11.8, min_s=5.0) == [(10.0, 16.3), (16.3, 24.3)]


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_s"):
        cut_at_pauses([], 0.0, 1.0, max_s=0.0, min_s=1.0)
