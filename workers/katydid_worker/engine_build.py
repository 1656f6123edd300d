"""How this machine's whisper.cpp was built: its compiler and the CPU features and kernels it was
compiled with (docs/engine.md). Read from the installed binding, never from the CPU."""

from __future__ import annotations

import re
from pathlib import Path


def build_info() -> str:
    """whisper.cpp's own account of how it was compiled (SIMD levels, LLAMAFILE, OPENMP...),
    after the compiler that built ggml's CPU kernels."""
    import _pywhispercpp as pw

    return f"COMPILER = {build_compiler()} | {str(pw.whisper_print_system_info()).strip()}"


_COMPILER_MARK = re.compile(rb"(clang version [0-9][0-9.]*|GCC: \([^)]*\) [0-9][0-9.]*)")


def build_compiler() -> str:
    """The compiler of ggml's CPU library, read from its ELF comment section ('clang 16.0.6',
    'gcc 12.2.0'), or 'unknown'. It matters: clang 16 ran the full-window encoder ~17% faster
    than GCC 12 on an AMD EPYC (docs/engine.md, "Engine build")."""
    import _pywhispercpp as pw

    libs = sorted(Path(pw.__file__).parent.glob("libggml-cpu*.so*"))
    if not libs:
        return "unknown"
    try:
        marks: set[bytes] = set(_COMPILER_MARK.findall(libs[0].read_bytes()))
    except OSError:
        return "unknown"
    # C runtime start files carry the system GCC's mark even in a clang build.
    for mark in sorted(marks, key=lambda m: not m.startswith(b"clang")):
        text = str(mark.decode("ascii", "replace"))
        if text.startswith("clang"):
            return "clang " + text.removeprefix("clang version ")
        return "gcc " + text.rsplit(" ", 1)[-1]
    return "unknown"


def has_fast_kernels(info: str) -> bool:
    """True when whisper.cpp has llamafile's matrix kernels: without them (PyPI's portable wheel)
    the engine measured ~1.4x slower on the shared clips; docs/engine.md has the fix."""
    return "LLAMAFILE = 1" in info
