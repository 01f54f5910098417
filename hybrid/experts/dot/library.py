"""The INT4 expert kernel (`int4_moe.cpp`) as a shared library: compiled on first use with the
system's C++ compiler into the user's cache, keyed by the source and the compiler, written beside
and renamed into place; loaded with ctypes, whose calls release the GIL.

torch is imported first: the library's OpenMP runtime then resolves to the copy torch loaded, so
the kernel runs on torch's own threads (as many as `torch.set_num_threads` says)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # noqa: F401  (first: see above)

from placement.cpu_probe import has

SOURCE = Path(__file__).with_name("int4_moe.cpp")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "hybrid" / "kernels"
# instruction sets the kernel has, strongest first: name, the code the kernel takes, CPU flags
ISAS = (("avx512_vnni", 2, ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")), ("avx2", 1, ("avx2", "fma")))


def runnable() -> list[str]:
    """The kernel's instruction sets that this CPU executes, strongest first."""
    return [name for name, _, flags in ISAS if has(*flags)]


def code(isa: str) -> int:
    return next(c for name, c, _ in ISAS if name == isa)


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.cache
def load() -> ctypes.CDLL | None:
    """The built library, or None where no compiler builds it (the reason is logged by `why_not`)."""
    return _build()[0]


@functools.cache
def why_not() -> str | None:
    """Why the library cannot be used here, or None when it can."""
    if not runnable():
        return "this CPU lacks AVX2, the least the INT4 dot kernel needs"
    return _build()[1]


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str | None]:
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler (g++ or $CXX) to build the INT4 dot kernel"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"the C++ compiler {cxx} does not run: {e}"
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    target = CACHE / f"int4_moe-{key}.so"
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=CACHE)
        os.close(fd)
        cmd = [cxx, "-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            os.unlink(tmp)
            return None, f"building the INT4 dot kernel failed: {' '.join(cmd)}\n{done.stderr[-2000:]}"
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    lib.hybrid_int4_moe.restype = lib.hybrid_int4_repack.restype = ctypes.c_int
    lib.hybrid_int4_moe.argtypes = [ctypes.c_int] * 7 + [ctypes.c_void_p] * 10
    lib.hybrid_int4_repack.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    return lib, None
