"""How the gateway's process hands freed buffers back to the system (glibc's malloc).

A session's upload, its decoded blocks and its job bodies are 50-500 KB buffers that live for a
second or so. glibc maps a buffer apart (and unmaps it when freed) only above its mmap
threshold, and that threshold rises to the size of every mapped buffer freed, up to 32 MB: after
the first few uploads every later one comes from the heap, where freed buffers stay between the
small objects of the sessions still open, and the process keeps them. Measured with 500
sessions that each uploaded one shared clip (220 KB on average) and wait in the queue (AMD EPYC,
Python 3.11.7): 147 KB of RSS per waiting session with glibc's default, 52 KB with a fixed
32 KB threshold, against 34 KB of Python objects per session. Smaller buffers freed in a burst
(500 clients uploading at once) leave whole free pages inside the heap: ``trim`` returns them
(140 -> 55 KB per waiting session after that burst).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

_M_MMAP_THRESHOLD = -3  # malloc.h


def fix_mmap_threshold(threshold_bytes: int) -> str | None:
    """Buffers of at least ``threshold_bytes`` are mapped apart and go back to the system when
    freed (a fixed threshold: glibc then stops raising it). 0 leaves glibc's default.

    Returns:
        None once set (or with 0), else why not, in words (not glibc, or glibc refused).
    """
    if threshold_bytes <= 0:
        return None
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return f"no mallopt in the C library ({ctypes.util.find_library('c')}): not glibc"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, threshold_bytes) != 1:
        return f"glibc refused an mmap threshold of {threshold_bytes} bytes"
    return None


def trim() -> bool:
    """Give the free pages inside the heap back to the system (glibc's ``malloc_trim``).

    Returns:
        Whether any memory went back (False, too, where there is no ``malloc_trim``).
    """
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None
