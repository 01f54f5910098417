"""What this CPU can run: instruction sets, which kt-kernel build loads and whether it can run
here, and the cores expert work runs on (from `placement.cpu_probe`, the one probe of the CPU).

kt-kernel ships one extension per instruction set and picks one at import (`KT_KERNEL_CPU_VARIANT`
overrides the choice). Its `AMX*_MOE` class names do not mean AMX: in the AVX-512 builds they are
AVX-512 kernels. Only the `amx` build executes AMX instructions, and there the tile kernels
(`AMXInt8_MOE`, `AMXInt4_MOE`, `AMXBF16_MOE`) die with SIGILL on a CPU without AMX, so a build
stronger than the CPU is treated as unusable.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from placement.cpu_probe import cores_by_node, has, memory, model_name, usable_cpus

log = logging.getLogger(__name__)

# kt-kernel's builds, weakest first, with the CPU flags each needs (as kt-kernel's loader checks them)
VARIANTS = (
    ("avx2", ("avx2",)),
    ("avx512_base", ("avx512f", "avx512bw")),
    ("avx512_vnni", ("avx512f", "avx512bw", "avx512_vnni")),
    ("avx512_vbmi", ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi")),
    ("avx512_bf16", ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16")),
    ("amx", ("avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")),
)
ISA = {"AMX": ("amx_tile", "amx_int8", "amx_bf16"), "AVX-512 BF16": ("avx512_bf16",),
       "AVX-512 VNNI": ("avx512_vnni",), "AVX-512": ("avx512f", "avx512bw"), "AVX2": ("avx2",)}


def isa() -> dict[str, bool]:
    """The instruction sets that matter for expert kernels, strongest first."""
    return {name: has(*need) for name, need in ISA.items()}


def describe() -> str:
    """The CPU in a few words: its model and strongest instruction set."""
    best = next((name for name, ok in isa().items() if ok), "no AVX2")
    return f"{model_name() or 'unknown CPU'}, {best}"


def native_variant() -> str | None:
    """The strongest kt-kernel build this CPU can execute."""
    runnable = [name for name, need in VARIANTS if has(*need)]
    return runnable[-1] if runnable else None


@dataclass(frozen=True)
class KtStatus:
    version: str | None  # None: not installed
    variant: str | None  # the build that loaded
    reason: str | None  # why it cannot be used here; None when it can

    @property
    def usable(self) -> bool:
        return self.reason is None


@functools.cache
def kt() -> KtStatus:
    """Import kt-kernel once and say whether its loaded build can run on this CPU."""
    try:
        import kt_kernel
    except Exception as e:  # ImportError, or its loader refusing this CPU
        return KtStatus(None, None, f"kt-kernel is not importable ({type(e).__name__}: {e})")
    version, variant = getattr(kt_kernel, "__version__", "?"), kt_kernel.__cpu_variant__
    levels = [name for name, _ in VARIANTS]
    native = native_variant()
    if native is None:
        return KtStatus(version, variant, "this CPU lacks AVX2, the least kt-kernel needs")
    if variant in levels and levels.index(variant) > levels.index(native):
        return KtStatus(version, variant, f"kt-kernel loaded its `{variant}` build, which this CPU cannot execute "
                                          f"(best it can run: `{native}`; check KT_KERNEL_CPU_VARIANT)")
    return KtStatus(version, variant, None)


def expert_cores(threads: int | None = None) -> list[int]:
    """The cores expert work runs on: the first `threads` (default: all) usable physical cores,
    node by node."""
    cores = [c for node in cores_by_node().values() for c in node]
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if threads > len(cores):
            log.warning("threads=%d but only %d physical cores are usable; using %d", threads, len(cores), len(cores))
        cores = cores[:threads]
    return cores


def threads_of(backend) -> str:
    """The threads an expert backend computes on: its own pool's, or torch's."""
    threads = getattr(backend, "threads", None)
    if threads:
        return f"{threads} thread{'s' * (threads != 1)}"
    return f"torch's {torch.get_num_threads()} threads"


def report() -> list[tuple[str, str]]:
    """What `hybrid doctor` shows: (item, value) rows."""
    status, nodes, cores = kt(), cores_by_node(), expert_cores()
    total, available = memory()
    rows = [("CPU", model_name() or "unknown")]
    rows += [(name, "yes" if ok else "no") for name, ok in isa().items()]
    rows += [("kt-kernel", status.version or "not installed"),
             ("kt-kernel build", f"{status.variant or '-'} (best this CPU runs: {native_variant() or 'none'})"),
             ("cores", f"{len(cores)} physical, {len(usable_cpus())} logical usable"),
             ("kt-kernel threads", f"{len(cores)}: kt-kernel on cores {cores[:-1]}, the caller's share on core {cores[-1]}"
              if len(cores) > 1 else f"1: kt-kernel on core {cores[0]}"),
             ("NUMA nodes", f"{len(nodes)}: " + "; ".join(f"node {n}: cores {c}" for n, c in nodes.items())),
             ("memory", f"{total / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available")]
    return rows
