"""kt-kernel prints from C++ to the process's stdout (load progress, "Goodbye" as its pools are
destroyed): keep it out of the runtime's output."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys


@contextlib.contextmanager
def quiet():
    """stdout, C++ writes included, goes nowhere in the block."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def silence_at_exit() -> None:
    """kt-kernel's pools print "Goodbye" to stdout as they are destroyed at exit: keep it out of
    the output of whatever ran."""
    sys.stdout.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
