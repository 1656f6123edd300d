"""The CPU this runs on, for reports (figures mean nothing without it): its model name and the
SIMD features whisper.cpp's kernels use, from Linux's /proc/cpuinfo."""

from __future__ import annotations

import platform
from pathlib import Path

# The features that decide which of ggml's kernels run (docs/engine.md, "Engine build").
SIMD_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile", "amx_int8")


def _field(name: str) -> str | None:
    """The first ``name : value`` line's value in /proc/cpuinfo (None: no such line, or no file)."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return next(
        (ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith(name)), None
    )


def cpu_model() -> str:
    """The CPU's model name ('AMD EPYC 7B13'), else what ``platform`` says, else 'unknown'."""
    return _field("model name") or platform.processor() or "unknown"


def cpu_simd_flags() -> list[str]:
    """The features of ``SIMD_FLAGS`` the CPU has, in the kernel's order (none where unknown)."""
    return [f for f in (_field("flags") or "").split() if f in SIMD_FLAGS]
