"""How a profile asks for routed experts to run on the CPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ExpertOptions:
    backend: str = "auto"  # "auto" | "kt" | "torch"
    method: str = "auto"  # "auto" | "int4_kgroup" | "amx_int4" | "amx_int8" | "bf16"
    threads: int | None = None
    cache_dir: Path | None = None
