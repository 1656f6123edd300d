"""Uploads wait in memory within their own bound and the gateway's (uploads.py), else on disk."""

from __future__ import annotations

import sys

from katydid.gateway.uploads import UploadMemory


def test_uploads_past_the_gateway_bound_go_to_disk_and_read_back_whole() -> None:
    memory = UploadMemory(total_bytes=250_000, per_upload_bytes=4_000_000)
    first, second = memory.upload(), memory.upload()
    for _ in range(2):
        first.write(b"a" * 65_536)
    assert memory.held == 131_072
    for _ in range(2):
        second.write(b"b" * 65_536)  # the second frame passes 250,000: to disk
    assert (memory.held, memory.spilled) == (131_072, 1)
    second.write(b"c" * 1000)
    assert memory.held == 131_072  # on disk now, whatever comes
    second.seek(0)
    assert second.read() == b"b" * 131_072 + b"c" * 1000
    first.close()
    assert memory.held == 0
    third = memory.upload()
    third.write(b"d" * 200_000)
    assert (memory.held, memory.spilled) == (200_000, 1)  # room again
    for f in (second, third):
        f.close()
    assert memory.held == 0


def test_an_upload_past_its_own_bound_goes_to_disk_and_gives_its_memory_back() -> None:
    memory = UploadMemory(total_bytes=10_000_000, per_upload_bytes=100_000)
    upload = memory.upload()
    upload.write(b"x" * 60_000)
    assert memory.held == 60_000
    upload.write(b"y" * 60_000)  # past its own 100,000
    assert (memory.held, memory.spilled) == (0, 0)
    upload.seek(0)
    assert upload.read() == b"x" * 60_000 + b"y" * 60_000
    upload.close()
    assert memory.held == 0


def test_an_upload_on_disk_holds_no_buffer_of_its_own() -> None:
    # Thousands of uploads wait on disk in a storm: each open buffered file held 4-8 KB.
    memory = UploadMemory(total_bytes=0, per_upload_bytes=4_000_000)
    uploads = [memory.upload() for _ in range(3)]
    try:
        for upload in uploads:
            upload.write(b"RIFF" + b"z" * 70_000)
            upload.write(b"!")
        assert memory.spilled == 3
        for upload in uploads:
            assert sys.getsizeof(upload._file) < 1000  # a raw file, not a buffered one
            upload.seek(0)
            assert upload.read(4) == b"RIFF"
            assert upload.read() == b"z" * 70_000 + b"!"
    finally:
        for upload in uploads:
            upload.close()
    assert memory.held == 0
