"""What a child process's exit status means, in words an operator can act on.

A whisper.cpp build that uses instructions the CPU rejects dies with SIGILL on its first
transcription (seen: ggml's AMX kernels compiled by GCC 12 on an Intel Xeon with AMX); a corrupt
model file dies with SIGSEGV. ``exit -4`` says neither.
"""

from __future__ import annotations

import signal

REBUILD_HINT = (
    "rebuild it for this host with AMX excluded: env PIP_NO_BINARY=pywhispercpp GGML_NATIVE=ON "
    "GGML_LLAMAFILE=ON CFLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
    "CXXFLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' CMAKE_INSTALL_RPATH='$ORIGIN' "
    "CMAKE_BUILD_WITH_INSTALL_RPATH=ON pip install --no-cache-dir --force-reinstall --no-deps "
    "pywhispercpp (docs/engine.md, 'Engine build')"
)


def describe_exit(returncode: int) -> str:
    """``-4`` -> ``"killed by SIGILL: this whisper.cpp build uses instructions ..."``."""
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        return f"killed by signal {-returncode}"
    if name == "SIGILL":
        return (
            "killed by SIGILL: this whisper.cpp build uses instructions this CPU rejects "
            f"(a build made for another CPU, or ggml's AMX kernels); {REBUILD_HINT}"
        )
    if name in ("SIGSEGV", "SIGBUS"):
        return f"killed by {name}: whisper.cpp crashed (a corrupt or truncated model file?)"
    return f"killed by {name}"
