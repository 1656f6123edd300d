"""Accuracy and speed evaluation: a manifest of clips with reference transcripts → WER and RTF.

The manifest is a TSV with at least the columns ``file`` (relative to the manifest's folder),
``duration_s`` and ``transcript``. Both sides are normalised with Whisper's English normaliser
before scoring, so casing, punctuation and spelled-out numbers do not count as errors.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import numpy as np

from katydid.errors import KatydidError


@dataclass(frozen=True, slots=True)
class Clip:
    path: Path
    duration_s: float
    reference: str

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True, slots=True)
class ClipResult:
    clip: str
    words: int
    errors: int
    audio_s: float
    compute_s: float
    hypothesis: str

    @property
    def wer(self) -> float:
        return error_rate(self.errors, self.words)


@dataclass(frozen=True, slots=True)
class EvalReport:
    clips: tuple[ClipResult, ...]

    @property
    def wer(self) -> float:
        """Pooled WER: all errors over all reference words."""
        return error_rate(sum(c.errors for c in self.clips), sum(c.words for c in self.clips))

    @property
    def audio_s(self) -> float:
        return sum(c.audio_s for c in self.clips)

    @property
    def compute_s(self) -> float:
        return sum(c.compute_s for c in self.clips)

    @property
    def rtf(self) -> float:
        return self.compute_s / self.audio_s if self.audio_s else math.nan

    def summary(self) -> dict[str, object]:
        """The JSON object ``katydid eval --json`` prints last."""
        return {
            "wer": round(self.wer, 5),
            "audio_s": round(self.audio_s, 3),
            "compute_s": round(self.compute_s, 3),
            "rtf": round(self.rtf, 5),
            "clips": [asdict(c) | {"wer": round(c.wer, 5)} for c in self.clips],
        }

    def table(self) -> str:
        """A Markdown table, one row per clip and a pooled row."""
        rows = [
            "| clip | words | errors | WER | audio s | compute s | RTF |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in self.clips:
            rtf = c.compute_s / c.audio_s if c.audio_s else math.nan
            rows.append(
                f"| {c.clip} | {c.words} | {c.errors} | {c.wer:.1%} | {c.audio_s:.1f} | "
                f"{c.compute_s:.2f} | {rtf:.3f} |"
            )
        rows.append(
            f"| **pooled** ({len(self.clips)} clips) | {sum(c.words for c in self.clips)} | "
            f"{sum(c.errors for c in self.clips)} | **{self.wer:.2%}** | {self.audio_s:.1f} | "
            f"{self.compute_s:.2f} | {self.rtf:.3f} |"
        )
        return "\n".join(rows)


def read_manifest(path: Path) -> list[Clip]:
    """Read a manifest TSV; ``file`` entries are relative to its folder.

    Raises:
        KatydidError: the file is unreadable, is not a UTF-8 TSV with the columns ``file`` and
            ``transcript``, has no clips, or a row has no file or a bad duration.
    """
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except OSError as exc:
        raise KatydidError(f"cannot read manifest {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise KatydidError(
            f"manifest {path} is not a UTF-8 TSV (file<TAB>transcript per line; an audio file"
            f" goes in one): {exc}"
        ) from None
    if not rows:
        raise KatydidError(f"manifest {path} lists no clips")
    if not {"file", "transcript"} <= set(rows[0]):
        raise KatydidError(f"manifest {path} needs the columns 'file' and 'transcript'")
    clips = []
    for line, row in enumerate(rows, start=2):
        transcript = (row["transcript"] or "").strip()
        if len(transcript) >= 2 and transcript[0] == transcript[-1] == '"':
            transcript = transcript[1:-1].replace('""', '"')  # a CSV-quoted field read raw
        if not row["file"]:
            raise KatydidError(f"manifest {path}, line {line}: no file")
        # An empty transcript is allowed: silence or noise, where every word heard is an error.
        try:
            duration = float(row.get("duration_s") or "nan")
        except ValueError:
            raise KatydidError(
                f"manifest {path}, line {line}: duration_s is not a number"
            ) from None
        clips.append(Clip(path.parent / row["file"], duration, transcript))
    return clips


@cache
def _normalizer() -> Callable[[str], str]:
    from whisper_normalizer.english import EnglishTextNormalizer

    normalizer: Callable[[str], str] = EnglishTextNormalizer()
    return normalizer


def normalize(text: str) -> str:
    """Whisper's English normalisation (case, punctuation, numbers, spellings), without the
    punctuation-only tokens it can leave (a trailing "..." became a "." that counted as a word)."""
    return " ".join(w for w in _normalizer()(text).split() if any(c.isalnum() for c in w))


def add_noise(samples: np.ndarray, snr_db: float, *, seed: str) -> np.ndarray:
    """``samples`` plus white Gaussian noise at ``snr_db`` (signal power over noise power), clipped
    to [-1, 1]. The noise depends only on ``seed`` (e.g. the clip's name), so runs compare.
    """
    rng = np.random.default_rng(list(hashlib.sha256(seed.encode()).digest()))
    power = float(np.mean(np.square(samples, dtype=np.float64))) if samples.size else 0.0
    noise = rng.standard_normal(samples.size) * math.sqrt(power / 10 ** (snr_db / 10))
    return np.clip(samples + noise, -1.0, 1.0).astype(np.float32)


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """``(errors, reference_words)`` after normalising both sides (Levenshtein over words)."""
    ref = normalize(reference).split()
    hyp = normalize(hypothesis).split()
    if not ref:
        return len(hyp), 0
    if not hyp:
        return len(ref), len(ref)
    import jiwer

    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return out.substitutions + out.deletions + out.insertions, len(ref)


def error_rate(errors: int, words: int) -> float:
    """Errors per reference word; with no reference words (silence, noise) anything heard is
    all wrong (1.0), nothing heard all right (0.0)."""
    return errors / words if words else float(errors > 0)


def wer(reference: str, hypothesis: str) -> float:
    """Normalised word error rate of one hypothesis."""
    return error_rate(*word_errors(reference, hypothesis))


@dataclass(frozen=True, slots=True)
class Heard:
    """What a recogniser returned for one clip."""

    text: str
    audio_s: float
    compute_s: float


def evaluate(clips: Iterable[Clip], transcribe: Callable[[Clip], Heard]) -> EvalReport:
    """Transcribe each clip with ``transcribe`` and score it."""
    results = []
    for clip in clips:
        try:
            heard = transcribe(clip)
        except KatydidError as exc:
            raise KatydidError(f"{clip.name}: {exc}") from exc
        errors, words = word_errors(clip.reference, heard.text)
        results.append(
            ClipResult(clip.name, words, errors, heard.audio_s, heard.compute_s, heard.text)
        )
    return EvalReport(tuple(results))


def dumps_summary(report: EvalReport) -> str:
    return json.dumps(report.summary(), ensure_ascii=False)
