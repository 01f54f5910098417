"""The C++ kernels beside this file as one shared library: compiled on first use with the system's
C++ compiler into the user's cache, keyed by the sources and the compiler, written beside and
renamed into place; loaded with ctypes, whose calls release the GIL.

torch is imported first: the library's OpenMP runtime then resolves to the copy torch loaded, so
the kernels run on torch's own threads (as many as `torch.set_num_threads` says)."""

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

SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))
HEADERS = sorted(Path(__file__).parent.glob("*.h"))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "hybrid" / "kernels"
# what each exported function takes: (name, argument types); each returns an int, 0 when done
SIGNATURES = (
    ("hybrid_int4_moe", [ctypes.c_int] * 7 + [ctypes.c_void_p] * 10),
    ("hybrid_int4_repack", [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]),
    ("hybrid_int4_dequantize", [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 4),
    ("hybrid_attention_probs", [ctypes.c_int] * 4 + [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                                     ctypes.c_int64, ctypes.c_float, ctypes.c_void_p]),
    ("hybrid_route", [ctypes.c_int] * 7 + [ctypes.c_float] + [ctypes.c_void_p] * 5),
    ("hybrid_mla_decode", [ctypes.c_int] * 2 + [ctypes.c_void_p] * 15 + [ctypes.c_int, ctypes.c_float, ctypes.c_float,
                                                                          ctypes.c_void_p]),
)


def load() -> ctypes.CDLL | None:
    """The built library, or None where it cannot be built (`why_not` says why)."""
    return _build()[0]


def why_not() -> str | None:
    """Why the library cannot be used here, or None when it can."""
    return _build()[1]


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str | None]:
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler (g++ or $CXX) to build the CPU kernels"
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"the C++ compiler {cxx} does not run: {e}"
    key = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS) + version.encode()).hexdigest()[:16]
    target = CACHE / f"hybrid-{key}.so"
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=CACHE)
        os.close(fd)
        cmd = [cxx, "-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", *map(str, SOURCES), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            os.unlink(tmp)
            return None, f"building the CPU kernels failed: {' '.join(cmd)}\n{done.stderr[-2000:]}"
        os.replace(tmp, target)
    lib = ctypes.CDLL(str(target))
    for name, args in SIGNATURES:
        f = getattr(lib, name)
        f.restype, f.argtypes = ctypes.c_int, args
    return lib, None
