"""The real model pipeline and engine: tiny.en converted here, transcribing real speech."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from katydid.audio import decode_container
from katydid.config import DEFAULT_MODEL
from katydid.errors import ModelError
from katydid.evaluation import read_manifest, wer
from katydid_worker import models
from katydid_worker.engine import Engine
from katydid_worker.engine_build import build_compiler, build_info, has_fast_kernels
from katydid_worker.engine_options import DecodeOptions, EngineOptions

pytestmark = pytest.mark.integration
LIMITS: dict[str, Any] = {"max_audio_s": 600.0, "max_bytes": 100_000_000}


def _katydid(*args: str, model_dir: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"KATYDID_MODEL_DIR": str(model_dir), "KATYDID_LOG_FORMAT": "json"}
    return subprocess.run(
        [sys.executable, "-m", "katydid", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )


def test_prepare_is_idempotent_and_recorded(model_dir: Path) -> None:
    path = models.model_path(model_dir, DEFAULT_MODEL)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["size"] == path.stat().st_size
    mtime = path.stat().st_mtime_ns
    assert models.prepare(model_dir, DEFAULT_MODEL) == path
    assert path.stat().st_mtime_ns == mtime
    assert models.is_prepared(model_dir, DEFAULT_MODEL, verify_hash=True)


def test_unprepared_or_missing_model_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"katydid model prepare tiny\.en"):
        models.resolve(tmp_path, DEFAULT_MODEL)
    with pytest.raises(ModelError, match="unknown model"):
        models.resolve(tmp_path, "huge")
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve(tmp_path, str(tmp_path / "nope.bin"))
    with pytest.raises(ModelError, match="not found"):
        Engine(tmp_path / "nope.bin")


def test_corrupt_model_fails_the_smoke_check_without_crashing_us(
    model_path: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "truncated.bin"
    broken.write_bytes(model_path.read_bytes()[:20_000_000])
    with pytest.raises(ModelError, match="smoke check"):
        models.smoke_check(broken, timeout_s=120)


def test_jfk_with_word_timestamps(model_path: Path, speech_dir: Path) -> None:
    clip = next(c for c in read_manifest(speech_dir / "manifest.tsv") if c.name == "jfk.wav")
    engine = Engine(model_path, EngineOptions(word_timestamps=True))
    tr = engine.transcribe(decode_container(clip.path, **LIMITS))
    assert wer(clip.reference, tr.text) <= 0.05
    assert tr.audio_s == pytest.approx(11.0, abs=0.01)
    words = [w for s in tr.segments for w in s.words]
    assert len(words) >= 15
    starts = [w.start_s for w in words]
    assert starts == sorted(starts)
    assert all(0 <= w.start_s <= w.end_s <= tr.audio_s + 0.01 for w in words)


def test_engine_releases_the_gil_while_transcribing(model_path: Path, speech_dir: Path) -> None:
    engine = Engine(model_path)
    audio = decode_container(speech_dir / "jfk.wav", **LIMITS)
    span: list[float] = []

    def work() -> None:
        span.append(time.monotonic())
        engine.transcribe(audio)
        span.append(time.monotonic())

    ticks: list[float] = []
    t = threading.Thread(target=work)
    t.start()
    while t.is_alive():
        ticks.append(time.monotonic())  # pure Python: runs only while the engine lets go of the GIL
        time.sleep(0.001)
    t.join()
    start, end = span
    inside = [start, *(x for x in ticks if start < x < end), end]
    longest_gap = max(b - a for a, b in itertools.pairwise(inside))
    # Held for the whole call, the GIL would leave one gap as long as the transcription.
    assert longest_gap < 0.5 * (end - start), (longest_gap, end - start)


def test_cli_eval_json_on_short_clips(model_dir: Path, speech_dir: Path, tmp_path: Path) -> None:
    lines = (speech_dir / "manifest.tsv").read_text(encoding="utf-8").splitlines()
    short = [lines[0]] + [
        str(speech_dir / ln.split("\t", 1)[0]) + "\t" + ln.split("\t", 1)[1]
        for ln in lines[1:]
        if ln and not ln.startswith("long/")
    ]
    manifest = tmp_path / "short.tsv"
    manifest.write_text("\n".join(short) + "\n", encoding="utf-8")
    proc = _katydid("eval", str(manifest), "--json", model_dir=model_dir)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(summary["clips"]) == 16
    assert summary["wer"] <= 0.05
    durations = [float(ln.split("\t")[1]) for ln in short[1:]]
    assert summary["audio_s"] == pytest.approx(sum(durations), abs=0.1)
    assert summary["compute_s"] > 0
    assert summary["rtf"] == pytest.approx(summary["compute_s"] / summary["audio_s"], rel=1e-3)
    assert "| **pooled** (16 clips)" in proc.stdout


def test_cli_transcribe_local_reports_bad_files_and_goes_on(
    model_dir: Path, speech_dir: Path, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"not audio" * 100)
    # Files it cannot read are said to be so (libsndfile said "System error" for one without
    # read permission; not tried here, where tests may run as root).
    missing, directory = tmp_path / "missing.wav", tmp_path / "dir.wav"
    directory.mkdir()
    proc = _katydid(
        "transcribe",
        "--local",
        "--json",
        str(garbage),
        str(missing),
        str(directory),
        str(speech_dir / "jfk.wav"),
        model_dir=model_dir,
    )
    assert proc.returncode == 1
    assert "garbage.wav" in proc.stderr
    assert "not a decodable audio file" in proc.stderr
    assert f"{missing}: cannot read it: No such file or directory" in proc.stderr
    assert f"{directory}: it is a directory, not an audio file" in proc.stderr
    out = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(out) == 1
    reference = "And so my fellow Americans, ask not what your country can do for you, ask what you can do for your country."
    assert wer(reference, out[0]["text"]) <= 0.05
    assert out[0]["segments"][0]["start_s"] >= 0


def test_cli_model_list(model_dir: Path) -> None:
    proc = _katydid("model", "list", model_dir=model_dir)
    assert proc.returncode == 0
    row = next(line for line in proc.stdout.splitlines() if line.startswith(DEFAULT_MODEL))
    assert row.split()[1:3] == ["yes", "yes"]


def test_clip_context_is_used_for_short_clips(model_path: Path, speech_dir: Path) -> None:
    clip = next(
        c for c in read_manifest(speech_dir / "manifest.tsv") if c.name == "ls_61-70968-0000.wav"
    )
    audio = decode_container(clip.path, **LIMITS)
    engine = Engine(model_path)
    tr = engine.transcribe(audio)
    assert tr.audio_ctx < 1500
    assert tr.fallback is None
    assert wer(clip.reference, tr.text) <= 0.1
    full = Engine(model_path, EngineOptions(clip_context=False)).transcribe(audio)
    assert full.audio_ctx == 1500
    assert wer(clip.reference, full.text) <= 0.1
    # What the smaller window buys is measured by `nox -s bench`, not here.


def test_speech_too_long_for_one_clip_sized_window_is_decoded_in_pieces(
    model_path: Path, speech_dir: Path
) -> None:
    # 12-30 s of speech: cut in its pauses into clip-sized pieces (pieces.py) when the engine
    # or the call asks for it (a worker's partials), else one full window. No CPU budget: a
    # busy machine must not turn a piece into a fallback here.
    clips = [c for c in read_manifest(speech_dir / "manifest.tsv") if 12 < c.duration_s <= 30]
    assert clips
    unbudgeted = EngineOptions(budget_ratio=1000.0)
    pieces = Engine(model_path, dataclasses.replace(unbudgeted, pieces=True))
    one = Engine(model_path, unbudgeted)
    for clip in clips:
        audio = decode_container(clip.path, **LIMITS)
        tr = pieces.transcribe(audio)
        whole = one.transcribe(audio)
        asked = one.transcribe(audio, decode=DecodeOptions(pieces=True))
        assert (asked.text, asked.audio_ctx) == (tr.text, tr.audio_ctx), clip.name
        assert whole.audio_ctx == 1500, clip.name
        assert tr.audio_ctx < 1500, (clip.name, tr.fallback)
        assert not tr.uncovered, clip.name
        starts = [s.start_s for s in tr.segments]
        assert starts == sorted(starts)
        assert tr.segments[-1].end_s <= clip.duration_s + 0.01
        # As good as one window, give or take a word heard differently.
        assert wer(clip.reference, tr.text) <= wer(clip.reference, whole.text) + 0.05, (
            clip.name,
            tr.text,
            whole.text,
        )


def test_looping_clip_at_a_tight_context_falls_back_to_the_full_window(
    model_path: Path, speech_dir: Path
) -> None:
    # Regression: at 256 positions these clips loop ("Go forward 10 meters." forty times).
    engine = Engine(model_path, EngineOptions(clip_ctx_steps=(256,)))
    clips = {c.name: c for c in read_manifest(speech_dir / "manifest.tsv")}
    for name in ("cmu_goforward.wav", "sr_english_123.wav"):
        tr = engine.transcribe(decode_container(clips[name].path, **LIMITS))
        assert tr.fallback is not None, name  # the guardrail caught it
        assert tr.audio_ctx == 1500
        # The answer, not the loop (forty repeats), and not nothing.
        assert 1 <= len(tr.text.split()) <= 2 * len(clips[name].reference.split()), tr.text
    assert engine.fallbacks == 2


def test_a_transcript_does_not_depend_on_what_the_engine_ran_before(
    model_path: Path, speech_dir: Path
) -> None:
    # Clip-sized windows of every size share one whisper.cpp context (whisper_contexts.py says
    # why that is safe without flash attention); the full window has its own. Each clip must come
    # out the same from a fresh engine as after runs at every other size.
    clips = [c for c in read_manifest(speech_dir / "manifest.tsv") if not c.name.startswith("long")]
    audio = {c.name: decode_container(c.path, **LIMITS) for c in clips}
    # No CPU budget: a busy machine must not turn a run into a fallback here (that is timing,
    # tested elsewhere); this test is about state left behind.
    unbudgeted = EngineOptions(budget_ratio=1000.0)
    shared = Engine(model_path, unbudgeted)
    runs = [shared.transcribe(a) for a in audio.values()]
    sizes = {tr.audio_ctx for tr in runs}
    assert len(sizes) >= 4, sizes  # several clip sizes and the full window took part
    # Fallbacks here come from the output checks (an echoed last phrase), never the clock.
    assert "budget" not in {tr.fallback for tr in runs}
    for name in ("ldc93s1_timit.wav", "librivox_ss01_0870.wav", "jfk.wav"):
        fresh = Engine(model_path, unbudgeted).transcribe(audio[name])
        again = shared.transcribe(audio[name])
        assert (again.text, again.audio_ctx) == (fresh.text, fresh.audio_ctx), name


@pytest.mark.parametrize("name", ["tiny.en", "tiny.en-q4_0"])
def test_other_weight_formats_prepare_and_transcribe(
    name: str, model_dir: Path, speech_dir: Path
) -> None:
    # The default (Q8_0) runs through every other test; f16 and Q4_0 are choices in the config.
    path = models.prepare(model_dir, name)
    assert path.name == f"ggml-{name}.bin"
    engine = Engine(path)
    clips = [c for c in read_manifest(speech_dir / "manifest.tsv") if not c.name.startswith("long")]
    refs, hyps = [], []
    for clip in clips[:6]:
        refs.append(clip.reference)
        hyps.append(engine.transcribe(decode_container(clip.path, **LIMITS)).text)
    assert wer(" ".join(refs), " ".join(hyps)) <= 0.08


def test_engine_build_is_reported_and_has_fast_kernels_under_nox() -> None:
    info = build_info()
    assert "CPU :" in info  # whisper.cpp's own system line, as workers log it
    if os.environ.get("KATYDID_EXPECT_FAST_ENGINE") != "1":
        pytest.skip("not run by nox, which installs whisper.cpp compiled with llamafile kernels")
    assert has_fast_kernels(info), info
    # ggml's AMX kernels, built by GCC 12, trap on the first Q8_0 matmul of an AMX host
    # (docs/engine.md, "Engine build"): the build must not contain them, whatever this host is.
    assert "AMX" not in info, info


def test_the_engine_names_its_compiler_and_nox_builds_with_clang_where_it_is() -> None:
    compiler = build_compiler()
    assert compiler.split(" ")[0] in {"gcc", "clang"}, compiler
    version = subprocess.run(
        [sys.executable, "-m", "katydid", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert f"COMPILER = {compiler}" in version, version
    assert "LLAMAFILE" in version, version
    # noxfile.py compiles whisper.cpp with clang 16+ where the host has it (~17% faster
    # full-window encoder than GCC 12 on an AMD EPYC), with the default compiler elsewhere,
    # and says which it chose.
    expected = os.environ.get("KATYDID_EXPECT_COMPILER")
    if not expected:
        pytest.skip("not run by nox, which picks the compiler")
    # A venv made before clang was installed keeps its GCC build: nox --reuse-venv=no.
    assert compiler.startswith(expected), f"engine built by {compiler}, nox chose {expected}"


def test_a_long_recording_is_cut_locally_as_the_server_cuts_a_file(
    model_path: Path, speech_dir: Path
) -> None:
    from katydid.config import Config
    from katydid_worker.local import transcribe_recording

    clip = next(c for c in read_manifest(speech_dir / "manifest.tsv") if c.duration_s > 60)
    engine = Engine(model_path)
    calls: list[float] = []
    transcribe = engine.transcribe

    def counted(audio: Any, **kwargs: Any) -> Any:
        calls.append(audio.size / 16_000)
        return transcribe(audio, **kwargs)

    engine.transcribe = counted  # type: ignore[method-assign]
    cfg = Config()
    tr = transcribe_recording(engine, decode_container(clip.path, **LIMITS), cfg)
    # Chunks of file_chunk_min_s..chunk_max_s, one engine call each, covering the recording.
    assert len(calls) >= 4
    assert all(s <= cfg.chunk_max_s + 0.01 for s in calls)
    assert sum(calls) == pytest.approx(clip.duration_s, abs=0.01)
    starts = [s.start_s for s in tr.segments]
    assert starts == sorted(starts)
    assert tr.segments[-1].end_s > clip.duration_s - 15
    assert wer(clip.reference, tr.text) <= 0.04
