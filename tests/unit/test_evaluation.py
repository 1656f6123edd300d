"""WER scoring and manifest reading (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest

from katydid.evaluation import Clip, Heard, evaluate, read_manifest, wer, word_errors


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
