"""How a profile asks for routed experts to run on the CPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from placement.profile import METHODS as PROFILE_METHODS

BACKENDS = ("auto", "dot", "kt", "torch")
METHODS = ("auto", *PROFILE_METHODS)


@dataclass(frozen=True)
class ExpertOptions:
    """backend: `kt` (kt-kernel, required), `torch` (portable), `auto` (kt-kernel where it can run).
    method: `int4_kgroup` runs the checkpoint's group-32 INT4 as stored; float (BF16/FP8) experts
    are quantized on load to `amx_int8` or `amx_int4`, or run as `bf16`; `auto` picks the first for
    INT4 weights and `amx_int8` for float ones. threads: cores for expert work (default: every
    usable physical core). cache_dir: where quantized float experts are kept between runs
    (default ~/.cache/hybrid/kt). self_check: prove each kernel against the float reference on
    this CPU before it serves, and fall back past one that disagrees (on by default)."""

    backend: str = "auto"
    method: str = "auto"
    threads: int | None = None
    cache_dir: Path | None = None
    self_check: bool = True

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
