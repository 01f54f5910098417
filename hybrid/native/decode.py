"""Which code the native decode kernels (`mla_decode.cpp`) run here: AVX512-BF16
where the CPU has it (AMX CPUs do), else AVX2 with FMA; None where neither runs or nothing builds,
and torch's ops serve instead."""

from __future__ import annotations

import functools

from hybrid.native import build
from placement.cpu_probe import bf16_math, has

CODES = {"avx512_bf16": 2, "avx2": 1}  # the kernels' `isa` argument


@functools.cache
def isa() -> str | None:
    if build.load() is None:
        return None
    return "avx512_bf16" if bf16_math() else "avx2" if has("avx2", "fma") else None
