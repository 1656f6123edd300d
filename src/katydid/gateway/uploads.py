"""Where uploaded files wait until they are decoded: memory, within a bound per upload and a bound
for the whole gateway, and past either, a temporary file.

``upload_memory_bytes`` bounds one upload; nothing bounded them together, so 500 clients that
each sent a 220 KB WAV at once held 110 MB of uploads in the gateway at the same moment (and
10,000 clients x 4 MB could hold 40 GB). ``upload_memory_total_bytes`` bounds the sum: an upload
that would take the gateway past it goes to disk (``$TMPDIR``), where it costs page cache, not
the gateway's memory.
"""

from __future__ import annotations

import errno
import io
import tempfile
from typing import Any


class UploadMemory:
    """The bytes of uploads the gateway holds in memory, against its bound."""

    def __init__(self, total_bytes: int, per_upload_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.per_upload_bytes = per_upload_bytes
        self.held = 0
        self.spilled = 0  # uploads sent to disk because the gateway's bound was reached

    def take(self, n: int) -> bool:
        if self.held + n > self.total_bytes:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n

    def upload(self) -> SpooledUpload:
        """A new upload's file (closed with its session, or once decoded)."""
        return SpooledUpload(self)


class SpooledUpload(tempfile.SpooledTemporaryFile):  # type: ignore[type-arg]
    """A spooled temporary file that stays in memory only while the gateway's bound allows."""

    def __init__(self, memory: UploadMemory) -> None:
        # Unbuffered on disk: a buffered temporary file holds a 4-8 KB buffer for as long as it
        # is open, and in a storm of uploads thousands wait on disk for their turn to be
        # decoded (10,000 clients: ~10 MB per gateway). Written a message at a time and read
        # by libsndfile a block at a time, they gain nothing from one.
        super().__init__(max_size=memory.per_upload_bytes, buffering=0, prefix="katydid-upload-")
        self._memory = memory
        self._held = 0
        self._on_disk = False

    def write(self, s: Any) -> int:
        if not self._on_disk:
            if self._memory.take(len(s)):
                self._held += len(s)
            else:
                self._memory.spilled += 1
                self.rollover()
        if not self._on_disk:
            written: int = super().write(s)
            return written
        # A raw file may take part of a write (a full disk, a signal): the rest is written too.
        view = memoryview(s).cast("B")
        while view:
            view = view[super().write(view) :]
        return len(s)

    def rollover(self) -> None:
        """To disk (by us, or by the file itself past ``upload_memory_bytes``): what it held
        in memory is the gateway's again.

        Raises:
            OSError: what was in memory did not reach the disk whole (a raw file may take part
                of a write).
        """
        if self._on_disk:
            return
        expected = self._held_in_memory()
        super().rollover()
        self._on_disk = True
        self._release()
        position = self.tell()
        if self.seek(0, io.SEEK_END) != expected:
            raise OSError(errno.EIO, "an upload could not be written to disk whole")
        self.seek(position)

    def _held_in_memory(self) -> int:
        position = self.tell()
        size = self.seek(0, io.SEEK_END)
        self.seek(position)
        return size

    def close(self) -> None:
        super().close()
        self._release()

    def _release(self) -> None:
        self._memory.give(self._held)
        self._held = 0
