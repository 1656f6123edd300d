"""The gateway's fixed mmap threshold (heap.py): freed upload-sized buffers go back to the
system instead of staying in the heap between the small objects of sessions still open."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from katydid.config import Config
from katydid.errors import ConfigError
from katydid.heap import fix_mmap_threshold

# The child's resident memory in KB (pages of whatever size this host has).
_RSS = """
import os
def rss_kb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
"""

# 400 sessions' worth: a 220 KB upload each (freed) between small objects that stay.
_UPLOADS = """
import sys
from katydid.heap import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold(32 * 1024) is None
big = bytearray(4 << 20); big[::4096] = b"x" * len(big[::4096]); del big  # raises glibc's own
before = rss_kb()
keep, uploads = [], []
for _ in range(400):
    buf = bytearray(220 * 1024); buf[::4096] = b"x" * len(buf[::4096]); uploads.append(buf)
    keep.append(bytearray(2000))
del uploads
print(rss_kb() - before)
"""


# 4,000 frame-sized buffers (under the threshold: from the heap) between small objects that
# stay; freed, their pages stay in the process until trimmed.
_FRAMES = """
from katydid.heap import fix_mmap_threshold, trim
assert fix_mmap_threshold(32 * 1024) is None
before = rss_kb()
keep, frames = [], []
for _ in range(4000):
    buf = bytearray(16 * 1024); buf[::4096] = b"x" * len(buf[::4096]); frames.append(buf)
    keep.append(bytearray(600))
del frames
freed = rss_kb() - before
print(freed, int(trim()), rss_kb() - before)
"""


def _run(code: str, *args: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", _RSS + code, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [int(word) for word in out.stdout.split()]


def _retained_kb(mode: str) -> int:
    return _run(_UPLOADS, mode)[0]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_upload_buffers_go_back_to_the_system_with_a_fixed_threshold() -> None:
    uploads_kb = 400 * 220
    default, fixed = _retained_kb("default"), _retained_kb("fixed")
    # glibc's own threshold keeps (most of) them; the fixed one returns them.
    assert default > uploads_kb / 2, default
    assert fixed < uploads_kb / 20, fixed


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_gives_back_the_free_pages_between_objects_that_stay() -> None:
    frames_kb = 4000 * 16
    before_trim, released, after_trim = _run(_FRAMES)
    assert before_trim > frames_kb / 2, before_trim  # kept in the heap...
    assert released == 1
    assert after_trim < before_trim / 2, (before_trim, after_trim)  # ...until trimmed


def test_zero_leaves_glibc_alone_and_the_bound_is_checked() -> None:
    assert fix_mmap_threshold(0) is None
    with pytest.raises(ConfigError, match="malloc_mmap_threshold_bytes"):
        Config(malloc_mmap_threshold_bytes=64 * 1024 * 1024)
