"""WER scoring and manifest reading (pure)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from katydid.errors import AudioError, KatydidError
from katydid.evaluation import (
    Clip,
    Heard,
    add_noise,
    evaluate,
    normalize,
    read_manifest,
    wer,
    word_errors,
)


def test_normalisation_ignores_case_punctuation_and_spelling() -> None:
    assert wer("Mr. Quilter is the apostle.", "mister quilter is the apostle") == 0.0
    assert wer("And so, my fellow Americans", "and so my fellow americans") == 0.0


def test_errors_are_counted() -> None:
    assert word_errors("the cat sat on the mat", "the cat sat on mat") == (1, 6)
    assert word_errors("a b c", "") == (3, 3)
    assert word_errors("", "hello") == (1, 0)
    assert wer("one thing", "another thing entirely") == pytest.approx(1.0)


def test_manifest_relative_paths_and_quoted_text(tmp_path: Path) -> None:
    (tmp_path / "m.tsv").write_text(
        "file\tduration_s\ttranscript\textra\n"
        "a.wav\t1.5\thello world\tx\n"
        'sub/b.wav\t2.0\t"say ""hi"" now"\ty\n',
        encoding="utf-8",
    )
    clips = read_manifest(tmp_path / "m.tsv")
    assert clips[0] == Clip(tmp_path / "a.wav", 1.5, "hello world")
    assert clips[1].path == tmp_path / "sub" / "b.wav"
    assert clips[1].reference == 'say "hi" now'


def test_pooled_wer_weights_by_words(tmp_path: Path) -> None:
    clips = [Clip(tmp_path / "a", 1.0, "red green blue black"), Clip(tmp_path / "b", 2.0, "white")]
    answers = {"a": "red green blue black", "b": "grey"}
    report = evaluate(clips, lambda c: Heard(answers[c.name], c.duration_s, c.duration_s / 4))
    assert report.wer == pytest.approx(1 / 5)
    assert report.rtf == pytest.approx(0.25)
    summary = report.summary()
    assert set(summary) >= {"wer", "audio_s", "compute_s", "rtf", "clips"}
    assert "**20.00%**" in report.table()


def test_add_noise_hits_the_snr_and_depends_only_on_the_seed() -> None:
    t = np.arange(16_000 * 3) / 16_000
    clean = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    for snr_db in (20.0, 10.0, 0.0):
        noisy = add_noise(clean, snr_db, seed="jfk.wav")
        assert noisy.dtype == np.float32
        assert noisy.shape == clean.shape
        noise = noisy.astype(np.float64) - clean
        measured = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise**2))
        assert measured == pytest.approx(snr_db, abs=0.2)
    np.testing.assert_array_equal(
        add_noise(clean, 10.0, seed="a.wav"), add_noise(clean, 10.0, seed="a.wav")
    )
    assert not np.array_equal(
        add_noise(clean, 10.0, seed="a.wav"), add_noise(clean, 10.0, seed="b.wav")
    )
    assert np.abs(add_noise(clean, -20.0, seed="a.wav")).max() <= 1.0  # clipped, never out of range
    np.testing.assert_array_equal(add_noise(np.zeros(0, np.float32), 10.0, seed="x"), [])


def test_eval_noise_is_refused_through_a_server(tmp_path: Path) -> None:
    # Called below main() so that this test leaves the process's logging configuration alone.
    import argparse

    from katydid.cli_transcribe import cmd_eval
    from katydid.config import Config
    from katydid.errors import KatydidError

    (tmp_path / "m.tsv").write_text("file\tduration_s\ttranscript\na.wav\t1.0\thello\n")
    args = argparse.Namespace(
        manifest=tmp_path / "m.tsv", url="ws://127.0.0.1:1", snr_db=10.0, json=False
    )
    with pytest.raises(KatydidError, match="--snr-db works with the local engine"):
        cmd_eval(Config(), args)


def test_punctuation_left_by_the_normaliser_is_not_a_word() -> None:
    assert normalize("In this regard...") == "in this regard"
    assert wer("in this regard", "In this regard...") == 0.0


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00\x80\xbb", "UTF-8 TSV"),
        (b"", "lists no clips"),
        (b"file\ttranscript\n", "lists no clips"),
        (b"name\ttext\na.wav\thello\n", "needs the columns"),
        (b"file\ttranscript\n\thello\n", "line 2: no file"),
        (b"file\tduration_s\ttranscript\na.wav\tlong\thello\n", "duration_s is not a number"),
    ],
)
def test_a_manifest_that_cannot_be_scored_is_refused_in_words(
    tmp_path: Path, content: bytes, says: str
) -> None:
    # A WAV given as the manifest was a UnicodeDecodeError traceback; an empty one scored
    # "0 clips, WER 0.00%" (and NaN in --json).
    (tmp_path / "m.tsv").write_bytes(content)
    with pytest.raises(KatydidError, match=says):
        read_manifest(tmp_path / "m.tsv")


def test_a_clip_that_fails_is_named(tmp_path: Path) -> None:
    def broken(clip: Clip) -> Heard:
        raise AudioError("not a WAV file")

    with pytest.raises(KatydidError, match=r"^b\.wav: not a WAV file$"):
        evaluate([Clip(tmp_path / "b.wav", 1.0, "hello")], broken)


def test_text_heard_where_nobody_speaks_is_not_a_wer_of_zero(tmp_path: Path) -> None:
    report = evaluate(
        [Clip(tmp_path / "silence.wav", 10.0, "")], lambda clip: Heard("thank you", 10.0, 0.1)
    )
    assert (report.clips[0].words, report.clips[0].errors) == (0, 2)
    assert report.clips[0].wer == 1.0
    assert report.wer == 1.0
    quiet = evaluate([Clip(tmp_path / "silence.wav", 10.0, "")], lambda clip: Heard("", 10.0, 0))
    assert quiet.wer == 0.0
