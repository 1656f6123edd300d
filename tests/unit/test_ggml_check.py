"""A file that is not a whole ggml model is refused in words before whisper.cpp (which
segfaults on it, silently) sees it."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from katydid.errors import ModelError
from katydid_worker.ggml import GGML_MAGIC
from katydid_worker.ggml_check import check_ggml


def _model(tensors: list[tuple[int, tuple[int, ...], bytes]]) -> bytes:
    """One encoder and one decoder layer (50 tensors): ``tensors`` and f32 ones to fill."""
    tensors = tensors + [(0, (1,), b"\0" * 4)] * (50 - len(tensors))
    out = struct.pack("<i", GGML_MAGIC) + struct.pack("<11i", 4, 4, 4, 4, 1, 4, 4, 4, 1, 4, 1)
    out += struct.pack("<2i", 2, 3) + b"\0" * (4 * 2 * 3)  # mel filters
    out += struct.pack("<i", 2) + struct.pack("<i", 1) + b"a" + struct.pack("<i", 2) + b"bc"
    for ttype, dims, data in tensors:
        name = b"encoder.w"
        out += struct.pack(f"<3i{len(dims)}i", len(dims), len(name), ttype, *dims) + name + data
    return out


WHOLE = _model([(0, (4, 2), b"\1" * 32), (8, (32,), b"\2" * 34)])  # f32 4x2, one q8_0 block


def test_a_whole_model_passes(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(WHOLE)
    check_ggml(path)


def test_every_truncation_is_refused_in_words(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    for n in range(len(WHOLE)):
        path.write_bytes(WHOLE[:n])
        with pytest.raises(ModelError, match=r"is not a whisper\.cpp ggml model"):
            check_ggml(path)


@pytest.mark.parametrize(
    "data", [b"RIFF\x24\x00\x00\x00WAVEfmt ", b"root:x:0:0:root:/root:/bin/bash\n", b"\0" * 4096]
)
def test_other_files_are_refused_in_words(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(data)
    with pytest.raises(ModelError, match="no ggml magic"):
        check_ggml(path)


def test_a_tensor_type_it_does_not_know_is_left_to_whisper_cpp(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(_model([(0, (4,), b"\0" * 16), (99, (4,), b"?")])[:-4])
    check_ggml(path)


def test_a_tensor_short_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(WHOLE[: -(4 + 12 + 4 + len(b"encoder.w"))])  # the last tensor cut off whole
    with pytest.raises(ModelError, match="holds 49 tensors where its hyperparameters need 50"):
        check_ggml(path)


def test_a_missing_file_is_said_in_words(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read model file"):
        check_ggml(tmp_path / "nothing.bin")
