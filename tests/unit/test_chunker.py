"""The utterance chunker: cuts at pauses, never over max_s, bounded, incremental."""

from __future__ import annotations

import numpy as np

from katydid.audio import SAMPLE_RATE
from katydid.chunker import Chunker
from tests.signals import vowel_pcm


def _voiced(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return np.rint(0.3 * 32767 * np.sin(2 * np.pi * 200 * t)).astype(np.int16)


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.int16)


def _feed_all(chunker: Chunker, audio: np.ndarray, frame: int = 1600) -> list[np.ndarray]:
    out = []
    for i in range(0, audio.size, frame):
        out += [c.audio for c in chunker.feed(audio[i : i + frame])]
    return out + [c.audio for c in chunker.flush()]


def test_cuts_in_pauses_after_min_length() -> None:
    audio = np.concatenate([_voiced(2.0), _silence(0.6), _voiced(2.0), _silence(0.6), _voiced(1.0)])
    chunks = _feed_all(Chunker(min_s=3.0, max_s=30.0, silence_s=0.3), audio)
    # The first pause comes before min_s: no cut there; the second one is the cut.
    assert len(chunks) == 2
    first = chunks[0].size / SAMPLE_RATE
    assert 4.6 < first < 5.2  # in the middle of the second pause
    assert sum(c.size for c in chunks) == audio.size


def test_files_are_cut_in_the_longest_pause_between_min_and_max() -> None:
    # Pauses of 0.4 s (at 3.0 s, past min), 1.0 s (at 5.4 s) and 0.4 s (at 8.4 s), max 10 s:
    # the first pause past min would cut at 3.2 s; the longest one is the cut.
    audio = np.concatenate(
        [
            _voiced(3.0), _silence(0.4), _voiced(2.0), _silence(1.0), _voiced(2.0),
            _silence(0.4), _voiced(5.0),
        ]
    )  # fmt: skip
    chunker = Chunker(min_s=2.0, max_s=10.0, silence_s=0.3, longest_pause=True)
    chunks = _feed_all(chunker, audio)
    first = chunks[0].size / SAMPLE_RATE
    assert 5.6 < first < 6.2, first  # the middle of the 1.0 s pause
    assert all(c.size <= 10 * SAMPLE_RATE for c in chunks)
    assert sum(c.size for c in chunks) == audio.size
    # Without a pause it still cuts by max_s, in the last third, as the first-pause rule does.
    sizes = [
        c.size / SAMPLE_RATE
        for c in _feed_all(Chunker(max_s=10.0, longest_pause=True), _voiced(25.0))
    ]
    assert all(10.0 * 2 / 3 - 0.03 <= s <= 10.0 for s in sizes[:-1]), sizes


def test_no_pause_means_a_cut_at_max_length() -> None:
    audio = _voiced(25.0)
    chunks = _feed_all(Chunker(min_s=3.0, max_s=10.0), audio)
    # No pause at all: each chunk but the last is cut in its last third, never past max_s.
    sizes = [c.size / SAMPLE_RATE for c in chunks]
    assert all(10.0 * 2 / 3 - 0.03 <= s <= 10.0 for s in sizes[:-1]), sizes
    assert 3 <= len(chunks) <= 4
    assert sum(c.size for c in chunks) == audio.size
    assert all(np.array_equal(c, audio[: c.size]) for c in chunks[:1])  # samples untouched


def test_cuts_and_offsets_follow_the_audio_and_silence_alone_is_dropped() -> None:
    chunker = Chunker(min_s=1.0, max_s=10.0)
    out = chunker.feed(np.concatenate([_voiced(1.5), _silence(1.0), _voiced(1.5)]))
    out += chunker.feed(_silence(0.5))
    out += chunker.flush()
    assert [c.seq for c in out] == [0, 1]
    assert out[0].offset_s == 0.0
    assert 1.95 <= out[0].duration_s <= 2.05  # cut in the middle of the pause
    assert out[1].offset_s == out[0].duration_s
    assert out[1].offset_s + out[1].duration_s == 4.5  # to the end of what was fed
    silent = Chunker(min_s=1.0, max_s=10.0)
    assert silent.feed(_silence(3.0)) + silent.flush() == []  # no voice: no job
    assert Chunker().flush() == []


def test_frame_size_does_not_change_the_cuts() -> None:
    audio = np.concatenate([_voiced(3.5), _silence(0.5), _voiced(4.0), _silence(0.5), _voiced(2.0)])
    a = [c.size for c in _feed_all(Chunker(min_s=3.0), audio, frame=1600)]
    b = [c.size for c in _feed_all(Chunker(min_s=3.0), audio, frame=7777)]
    assert a == b


def _live() -> Chunker:
    return Chunker(min_s=1.0, max_s=30.0, silence_s=0.5, eager=True, vad=True)


def test_live_cuts_once_the_pause_is_long_enough_without_waiting_for_more_speech() -> None:
    chunker = _live()
    assert chunker.feed(vowel_pcm(2.0)) == []
    assert chunker.feed(_silence(0.3)) == []  # not yet a pause
    (chunk,) = chunker.feed(_silence(0.3))  # 0.6 s of pause: the utterance is over
    assert 2.1 <= chunk.duration_s <= 2.3  # the speech and ~0.2 s of the pause
    assert chunk.offset_s == 0.0
    # More silence makes no job; the next utterance starts near its speech, at the right time.
    assert chunker.feed(_silence(5.0)) == []
    assert chunker.buffered_s <= 0.35
    (second,) = chunker.feed(np.concatenate([vowel_pcm(1.5), _silence(0.6)]))
    assert 2.0 + 0.3 + 5.0 - 0.35 <= second.offset_s <= 2.0 + 0.3 + 5.0
    assert chunker.flush() == []


def test_live_does_not_end_an_utterance_shorter_than_min_s() -> None:
    chunker = _live()
    assert chunker.feed(np.concatenate([vowel_pcm(0.6), _silence(0.6)])) == []
    (chunk,) = chunker.feed(np.concatenate([vowel_pcm(1.0), _silence(0.6)]))
    assert chunk.duration_s >= 2.2  # both stretches of speech, one utterance


def test_live_partials_wait_for_speech() -> None:
    chunker = _live()
    chunker.feed(_silence(3.0))
    # Near-silence (no partial for it): WebRTC's detector is coarse (a steady tone or noise may
    # pass; the engine's Silero detector gives those no text), so it gates only cheaply here.
    chunker.feed(np.random.default_rng(1).integers(-8, 8, 2 * SAMPLE_RATE).astype(np.int16))
    assert not chunker.has_speech()
    chunker.feed(vowel_pcm(1.0))
    assert chunker.has_speech()


def test_live_speech_without_long_pauses_is_cut_at_short_ones_past_the_soft_max() -> None:
    # Fluent reading: 3 s sentences with 0.25 s between them, never the 0.5 s a pause needs.
    sentence = np.concatenate([vowel_pcm(3.0), _silence(0.25)])
    audio = np.concatenate([sentence] * 8)  # 26 s
    hard = [c.size / SAMPLE_RATE for c in _feed_all(_live(), audio)]
    assert hard[0] > 25.0  # one utterance: a full-window decode, its final at the end
    soft = Chunker(min_s=1.0, max_s=30.0, silence_s=0.5, eager=True, vad=True, soft_max_s=10.0)
    sizes = [c.size / SAMPLE_RATE for c in _feed_all(soft, audio)]
    # Cut at the latest short pause once 10 s have run: whole sentences, none over ~10 s.
    assert all(6.0 <= s <= 10.0 for s in sizes[:-1]), sizes
    assert len(sizes) >= 3
    # Each cut keeps ~0.2 s of its pause; the rest of a pause is not sent (live).
    assert sum(sizes) <= audio.size / SAMPLE_RATE
    # A long pause still ends an utterance before the soft max.
    short = _feed_all(soft, np.concatenate([vowel_pcm(2.0), _silence(0.6), vowel_pcm(2.0)]))
    assert len(short) == 2
