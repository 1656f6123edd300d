"""Reader for CTranslate2 model binaries (``model.bin``), numpy only.

Layout (CTranslate2 binary version 6, little endian):

    u32 version | string spec_name | u32 revision | u32 n_vars
    n_vars x (string name | u8 rank | rank x u32 dim | u8 dtype | u32 n_bytes | bytes)
    u32 n_aliases | n_aliases x (string alias | string target)

A string is a u16 length (including the trailing NUL) followed by that many bytes.

Rule 1: the reader never loads what it does not need into Python objects; arrays are
views on one memory map, so converting a large model costs little more than its output.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from katydid.errors import ModelError

# CTranslate2's DataType enum order (include/ctranslate2/types.h).
_DTYPES: dict[int, np.dtype[np.generic]] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
}
_DTYPE_IDS = {v: k for k, v in _DTYPES.items()}
SUPPORTED_VERSIONS = (5, 6)


@dataclass(frozen=True, slots=True)
class Ct2Model:
    """A parsed CTranslate2 model: its spec name, revision and variables by name."""

    spec: str
    revision: int
    variables: Mapping[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.variables[name]
        except KeyError:
            raise ModelError(f"CTranslate2 model has no variable {name!r}") from None


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self._buf = buf
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self._buf):
            raise ModelError("CTranslate2 model file is truncated")
        view = self._buf[self.pos : self.pos + n]
        self.pos += n
        return view

    def u8(self) -> int:
        return int(self.take(1)[0])

    def u16(self) -> int:
        return int(struct.unpack("<H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack("<I", self.take(4))[0])

    def string(self) -> str:
        raw = bytes(self.take(self.u16()))
        if not raw.endswith(b"\0"):
            raise ModelError("CTranslate2 model file has a malformed string")
        return raw[:-1].decode("utf-8")


def read_ct2(path: Path) -> Ct2Model:
    """Parse a CTranslate2 ``model.bin``.

    Args:
        path: the ``model.bin`` file.

    Returns:
        The model, its arrays backed by a read-only memory map of the file.

    Raises:
        ModelError: the file is missing, truncated or of an unknown version or dtype.
    """
    try:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read CTranslate2 model {path}: {exc}") from exc
    cur = _Cursor(memoryview(mapped))  # type: ignore[arg-type]
    version = cur.u32()
    if version not in SUPPORTED_VERSIONS:
        raise ModelError(f"unsupported CTranslate2 binary version {version} in {path}")
    spec = cur.string()
    revision = cur.u32()
    variables: dict[str, np.ndarray] = {}
    for _ in range(cur.u32()):
        name = cur.string()
        shape = tuple(cur.u32() for _ in range(cur.u8()))
        dtype_id = cur.u8()
        n_bytes = cur.u32()
        if dtype_id not in _DTYPES:
            raise ModelError(f"variable {name!r} has unsupported dtype id {dtype_id}")
        start = cur.pos
        cur.take(n_bytes)
        arr = np.frombuffer(
            mapped,
            dtype=_DTYPES[dtype_id],
            count=n_bytes // _DTYPES[dtype_id].itemsize,
            offset=start,
        )
        variables[name] = arr.reshape(shape)
    for _ in range(cur.u32()):
        alias, target = cur.string(), cur.string()
        if target in variables:
            variables[alias] = variables[target]
    return Ct2Model(spec=spec, revision=revision, variables=variables)


def write_ct2(
    path: Path,
    spec: str,
    revision: int,
    variables: Mapping[str, np.ndarray],
    aliases: Mapping[str, str] | None = None,
) -> None:
    """Write a CTranslate2 binary (used by tests to build small synthetic models).

    Args:
        path: destination file.
        spec: spec name, e.g. ``"WhisperSpec"``.
        revision: spec revision.
        variables: arrays by name, of a dtype CTranslate2 knows.
        aliases: alias name -> variable name.
    """

    def _string(s: str) -> bytes:
        raw = s.encode("utf-8") + b"\0"
        return struct.pack("<H", len(raw)) + raw

    with path.open("wb") as out:
        out.write(struct.pack("<I", 6) + _string(spec) + struct.pack("<I", revision))
        out.write(struct.pack("<I", len(variables)))
        for name, value in variables.items():
            arr = np.asarray(value, order="C")  # not ascontiguousarray: it turns 0-d into 1-d
            out.write(_string(name) + struct.pack("<B", arr.ndim))
            out.write(b"".join(struct.pack("<I", d) for d in arr.shape))
            out.write(struct.pack("<BI", _DTYPE_IDS[arr.dtype.newbyteorder("<")], arr.nbytes))
            out.write(arr.tobytes())
        pairs = list((aliases or {}).items())
        out.write(struct.pack("<I", len(pairs)))
        for alias, target in pairs:
            out.write(_string(alias) + _string(target))


def iter_layers(model: Ct2Model, prefix: str) -> Iterator[int]:
    """Yield layer indices ``0..n-1`` present under ``prefix`` (``encoder`` or ``decoder``)."""
    i = 0
    while f"{prefix}/layer_{i}/ffn/linear_0/weight" in model.variables:
        yield i
        i += 1
