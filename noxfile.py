"""Katydid's automation: the test tiers (``unit``, ``tests``), lint, typecheck, and the lab
(bench, latency, load, chaos, eval).

Dependencies come from pyproject.toml (the project itself and its dependency groups), never
repeated here. Every session forwards ``session.posargs``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_venv = "yes"
PYPROJECT = nox.project.load_toml("pyproject.toml")
SPEECH = Path(__file__).resolve().parent.parent / "shared" / "data" / "speech"


def _clang() -> dict[str, str]:
    """CC/CXX for clang 16 or newer where the host has it: the same whisper.cpp ran its
    full-window encoder ~17% faster built by clang 16 than by GCC 12 on an AMD EPYC (clip-sized
    windows ~4%); docs/engine.md, "Engine build". Hosts without it use their default compiler."""
    for version in range(22, 15, -1):
        cc, cxx = shutil.which(f"clang-{version}"), shutil.which(f"clang++-{version}")
        if cc and cxx:
            return {"CC": cc, "CXX": cxx}
    return {}


# whisper.cpp is compiled here, for this CPU, with llamafile's matrix kernels: PyPI's wheel of
# pywhispercpp is a portable AVX2 build without them, measured ~1.4x slower on the shared clips
# (docs/engine.md). pywhispercpp's setup.py hands its environment to CMake as -D flags;
# the RPATH ones make its extension find its libraries where the wheel puts them (it otherwise
# points at the deleted build directory). AMX is excluded: GCC 12 (Debian's) miscompiles ggml's
# tile set-up (its _tile_loadconfig tells the optimiser it reads 8 bytes of the 64-byte config, so
# the rows/colsb stores are dropped) and the first AMX matmul traps with SIGILL on AMX hosts; the
# -mno-amx-* flags win over -march=native whatever their order (docs/engine.md), with
# clang as with GCC.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
ENGINE_BUILD = {
    "PIP_NO_BINARY": "pywhispercpp",
    "GGML_NATIVE": "ON",
    "GGML_LLAMAFILE": "ON",
    "CMAKE_INSTALL_RPATH": "$ORIGIN",
    "CMAKE_BUILD_WITH_INSTALL_RPATH": "ON",
    "CFLAGS": NO_AMX,
    "CXXFLAGS": NO_AMX,
} | _clang()


def _processes() -> list[str]:
    """pytest-xdist's processes for the full suite: two where the host has two CPUs or more,
    else one (``KATYDID_TEST_PROCESSES`` overrides, 0 or 1: in this process). Its integration
    tests spend much of their time waiting (a server starting, a paced stream, a timeout under
    test): two processes on 2 cores (AMD EPYC) took the run from 8m50s to ~5m50s. Never more
    than two by default: each holds its servers and models, and a small host would not hold
    more. Under the doubled load a clip-sized decode can overrun its CPU budget and be decoded
    again in the full window, so tests compare transcripts with a tolerance, never exactly.
    ``loadscope`` keeps each module's tests (and its module-scoped stack) in one process."""
    default = 2 if (os.cpu_count() or 1) >= 2 else 0
    n = int(os.environ.get("KATYDID_TEST_PROCESSES") or default)
    return ["-n", str(n), "--dist", "loadscope"] if n > 1 else ["-n", "0"]


def _group(name: str) -> list[str]:
    return list(PYPROJECT["dependency-groups"][name])


@nox.session
def tests(session: nox.Session) -> None:
    """Run the unit and integration tests (real model, real speech)."""
    # [base]: the multilingual model, for the tests of per-session models and languages.
    session.install("-e", ".[base]", *_group("test"), env=ENGINE_BUILD)
    # A test checks that the compiled build is the one installed (not PyPI's wheel).
    # Under nox nothing the suite needs may be missing: a slow engine build, the base model's
    # packages or the speech clips fail the tests that need them, where elsewhere they skip.
    session.run(
        "pytest",
        *_processes(),
        *session.posargs,
        env={
            "KATYDID_EXPECT_FAST_ENGINE": "1",
            "KATYDID_REQUIRE_SPEECH": "1",
            "KATYDID_EXPECT_COMPILER": "clang" if "CC" in ENGINE_BUILD else "gcc",
        },
    )


@nox.session
def unit(session: nox.Session) -> None:
    """The fast tier: unit tests only (no nats-server running, no model, no engine build)."""
    # PyPI's portable pywhispercpp wheel: no unit test decodes speech, so nothing is compiled.
    session.install("-e", ".", *_group("test"))
    session.run("pytest", "tests/unit", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check style with ruff."""
    session.install(*_group("lint"))
    session.run("ruff", "check", "src", "workers", "tests", "noxfile.py", *session.posargs)
    session.run("ruff", "format", "--check", "src", "workers", "tests", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    """Check types with mypy (strict)."""
    # Types need no compiled engine: PyPI's wheel of pywhispercpp will do (and is not checked).
    session.install("-e", ".", *_group("typecheck"), *_group("test"))
    session.run("mypy", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Engine side by side with faster-whisper on live traffic's lengths (--mix: per length
    bucket), then N-process throughput."""
    session.install("-e", ".[bench]", env=ENGINE_BUILD)
    session.run("katydid", "model", "prepare")
    if "--long" in session.posargs:
        # Long recordings: local, through serve (2 workers), whisper.cpp on the whole
        # file, faster-whisper beam 1 and 5; the rest of posargs go to `tests.bench long`.
        rest = [a for a in session.posargs if a != "--long"]
        session.run("python", "-m", "tests.bench", "long", *rest)
        return
    session.run(
        "python", "-m", "tests.bench", "engine", "--compare", "faster-whisper", "--mix", "--passes", "2",
        *session.posargs,
    )  # fmt: skip
    session.run("python", "-m", "tests.bench", "engine", "--duration", "20")


@nox.session
def latency(session: nox.Session) -> None:
    """Live latency on an idle `katydid serve`: the shared clips streamed in real time (~3 min)."""
    session.install("-e", ".", env=ENGINE_BUILD)
    session.run("katydid", "model", "prepare")
    session.run("python", "-m", "tests.bench", "latency", *session.posargs)


@nox.session
def load(session: nox.Session) -> None:
    """The seed scenario: `katydid serve` (2 workers) under load, engine baseline in the same run."""
    session.install("-e", ".[plot]", env=ENGINE_BUILD)
    session.run("katydid", "model", "prepare")
    defaults = ["--serve", "--workers", "2", "--engine-baseline", "--report", "reports/load"]
    session.run("katydid", "load", *defaults, *session.posargs)


@nox.session
def chaos(session: nox.Session) -> None:
    """Fault scenarios against real processes; writes reports/chaos/report.md and .json."""
    session.install("-e", ".", *_group("test"), env=ENGINE_BUILD)
    session.run("python", "-m", "tests.chaos", *session.posargs)


@nox.session
def eval(session: nox.Session) -> None:
    """WER and real-time factor of the local engine on the shared speech clips."""
    session.install("-e", ".", env=ENGINE_BUILD)
    session.run("katydid", "model", "prepare")
    manifest = session.posargs or [str(SPEECH / "manifest.tsv")]
    session.run("katydid", "eval", *manifest)
