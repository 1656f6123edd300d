"""Is a file a whole whisper.cpp ggml model? Checked before whisper.cpp loads it, which on a
file that is not one (a WAV given as ``--model``, ``/etc/passwd``, an empty file, a download
cut off at 2 MB) reads past what is there and segfaults: exit 139, nothing said.

The layout (``ggml.py`` writes it): magic, 11 hparams, the mel filters, the vocabulary, then
tensors (rank, name length, type, dims, name, data) to the end of the file. Only headers are
read; the data is seeked over, so a 1.5 GB model is checked in milliseconds.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

from katydid.errors import ModelError
from katydid_worker.ggml import GGML_MAGIC

# ggml type id: (elements per block, bytes per block). A type not listed ends the check
# there (whisper.cpp may know it; this check must never refuse a model it would load).
_TYPE_SIZES = {
    0: (1, 4),  # f32
    1: (1, 2),  # f16
    2: (32, 18),  # q4_0
    3: (32, 20),  # q4_1
    6: (32, 22),  # q5_0
    7: (32, 24),  # q5_1
    8: (32, 34),  # q8_0
    9: (32, 36),  # q8_1
    10: (256, 84),  # q2_k
    11: (256, 110),  # q3_k
    12: (256, 144),  # q4_k
    13: (256, 176),  # q5_k
    14: (256, 210),  # q6_k
    15: (256, 292),  # q8_k
    30: (1, 2),  # bf16
}
_MAX_COUNT = 1 << 24  # more vocabulary entries, filter values or elements per dim: not a model


def check_ggml(path: Path) -> None:
    """Raise ``ModelError`` saying what is wrong if ``path`` is not a whole ggml model."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            _check(f, size)
    except _Bad as exc:
        raise ModelError(f"{path} is not a whisper.cpp ggml model: {exc}") from None
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror or exc}") from None


class _Bad(Exception):
    pass


def _ints(f: BinaryIO, n: int, what: str) -> tuple[int, ...]:
    data = f.read(4 * n)
    if len(data) < 4 * n:
        raise _Bad(f"it ends inside its {what} (truncated?)")
    return struct.unpack(f"<{n}i", data)


def _skip(f: BinaryIO, n: int, size: int, what: str) -> None:
    if n < 0 or f.tell() + n > size:
        raise _Bad(f"it ends inside its {what} (truncated?)")
    f.seek(n, 1)


def _check(f: BinaryIO, size: int) -> None:
    (magic,) = _ints(f, 1, "header")
    if magic & 0xFFFFFFFF != GGML_MAGIC:
        raise _Bad(f"no ggml magic at its start ({size} bytes)")
    hparams = _ints(f, 11, "hyperparameters")
    if any(not 0 < v < _MAX_COUNT for v in hparams[:10]):
        raise _Bad(f"implausible hyperparameters {hparams[:10]}")
    n_mel, n_fft = _ints(f, 2, "mel filters")
    if not (0 < n_mel < 1024 and 0 < n_fft < 4096):
        raise _Bad(f"implausible mel filter shape {n_mel} x {n_fft}")
    _skip(f, 4 * n_mel * n_fft, size, "mel filters")
    (n_vocab,) = _ints(f, 1, "vocabulary")
    if not 0 < n_vocab < _MAX_COUNT:
        raise _Bad(f"implausible vocabulary size {n_vocab}")
    for _ in range(n_vocab):
        (length,) = _ints(f, 1, "vocabulary")
        _skip(f, length, size, "vocabulary")
    tensors = 0
    while f.tell() < size:
        rank, name_len, ttype = _ints(f, 3, f"tensor {tensors + 1}'s header")
        if not (1 <= rank <= 4 and 0 < name_len < 1024):
            raise _Bad(f"tensor {tensors + 1} has a malformed header")
        dims = _ints(f, rank, f"tensor {tensors + 1}'s header")
        if any(not 0 < d < _MAX_COUNT for d in dims):
            raise _Bad(f"tensor {tensors + 1} has implausible dimensions {dims}")
        _skip(f, name_len, size, f"tensor {tensors + 1}'s name")
        if ttype not in _TYPE_SIZES:
            return  # a type this check does not know: whisper.cpp has the last word
        per_block, block_bytes = _TYPE_SIZES[ttype]
        if dims[0] % per_block:
            raise _Bad(f"tensor {tensors + 1}'s rows do not fill whole blocks of its type")
        elements = 1
        for d in dims[1:]:
            elements *= d
        _skip(f, dims[0] // per_block * block_bytes * elements, size, f"tensor {tensors + 1}")
        tensors += 1
    # What whisper.cpp loads: 11 tensors outside the layers, 15 per encoder layer and 24 per
    # decoder layer (attention without a key bias); a file cut at a tensor's end has fewer.
    expected = 11 + 15 * hparams[4] + 24 * hparams[8]
    if tensors != expected:
        raise _Bad(f"it holds {tensors} tensors where its hyperparameters need {expected}")
