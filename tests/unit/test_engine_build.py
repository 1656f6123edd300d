"""The whisper.cpp build cannot contain ggml's AMX kernels, on any host, and a crash says why.

GCC 12's ``_tile_loadconfig`` declares that it reads 8 bytes of the 64-byte tile configuration,
so the optimiser drops ggml's ``rows[]``/``colsb[]`` stores and the first AMX matmul traps with
SIGILL on an AMX host (docs/engine.md, "Engine build"). ggml compiles those kernels only where
``__AMX_INT8__`` is defined, so these tests compile for an AMX CPU (whatever this host is) with
the flags our build commands pass and check the macro is gone.
"""

from __future__ import annotations

import ast
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from katydid.exits import REBUILD_HINT, describe_exit

ROOT = Path(__file__).resolve().parents[2]
AMX_TARGET = "-march=sapphirerapids"  # an Intel Xeon with AMX: what GGML_NATIVE=ON gets there


def _nox_engine_build() -> dict[str, str]:
    """ENGINE_BUILD as noxfile.py writes it (read, not imported: nox may be absent here)."""
    tree = ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8"))
    consts = {
        n.targets[0].id: n.value
        for n in tree.body
        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Name)
    }
    build = consts["ENGINE_BUILD"]
    if isinstance(build, ast.BinOp):  # {flags} | _clang(): the compiler is chosen at run time
        build = build.left
    assert isinstance(build, ast.Dict)
    out: dict[str, str] = {}
    for k, v in zip(build.keys, build.values, strict=True):
        assert isinstance(k, ast.Constant)
        value = consts[v.id] if isinstance(v, ast.Name) else v
        assert isinstance(value, ast.Constant)
        out[str(k.value)] = str(value.value)
    return out


def _doc_flags(page: str) -> dict[str, str]:
    """CFLAGS/CXXFLAGS of the install command a page shows (its first sh block that sets them)."""
    text = (ROOT / page).read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```sh\n")[1:]]
    command = next(b for b in blocks if "CFLAGS=" in b)
    return dict(re.findall(r"(CFLAGS|CXXFLAGS)='([^']*)'", command))


def _amx_macros(compiler: str, flags: str) -> list[str]:
    out = subprocess.run(
        [compiler, AMX_TARGET, *flags.split(), "-dM", "-E", "-x", "c", "-"],
        input="",
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sorted(m for m in re.findall(r"#define (__AMX_\w+__)", out))


@pytest.mark.parametrize("where", ["noxfile.py", "README.md", "docs/engine.md"])
def test_build_flags_exclude_amx_on_an_amx_host(where: str) -> None:
    flags = _nox_engine_build() if where == "noxfile.py" else _doc_flags(where)
    assert flags.get("CFLAGS")
    assert flags["CFLAGS"] == flags.get("CXXFLAGS")
    # Every compiler the documented command or noxfile.py may pick (clang 16+ where present).
    candidates = ("gcc", "clang", *(f"clang-{v}" for v in range(16, 23)))
    compilers = [c for c in candidates if shutil.which(c)]
    if not compilers:
        pytest.skip("no C compiler here")
    for cc in compilers:
        assert _amx_macros(cc, "") != [], f"{cc} {AMX_TARGET} should enable AMX (test premise)"
        assert _amx_macros(cc, flags["CFLAGS"]) == [], f"{cc} still compiles AMX with {flags}"


def test_a_sigill_child_is_explained_in_words() -> None:
    child = subprocess.run(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"],
        check=False,
    )
    assert child.returncode == -signal.SIGILL
    text = describe_exit(child.returncode)
    assert text.startswith("killed by SIGILL: this whisper.cpp build uses instructions")
    assert REBUILD_HINT in text
    assert "-mno-amx-int8" in text


def test_other_exits_are_named() -> None:
    assert describe_exit(3) == "exit code 3"
    assert describe_exit(-signal.SIGSEGV).startswith("killed by SIGSEGV: whisper.cpp crashed")
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
