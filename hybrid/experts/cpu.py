"""What this CPU can run: instruction sets, which kt-kernel build loads and whether it can run
here, the cores and NUMA nodes this process may use, and host memory.

kt-kernel ships one extension per instruction set and picks one at import (`KT_KERNEL_CPU_VARIANT`
overrides the choice). Its `AMX*_MOE` class names do not mean AMX: in the AVX-512 builds they are
AVX-512 kernels. Only the `amx` build executes AMX instructions, and there the tile kernels
(`AMXInt8_MOE`, `AMXInt4_MOE`, `AMXBF16_MOE`) die with SIGILL on a CPU without AMX, so a build
stronger than the CPU is treated as unusable.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

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


@functools.cache
def _cpuinfo(field: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def flags() -> frozenset[str]:
    return frozenset(_cpuinfo("flags").split())


def has(*names: str) -> bool:
    """Every flag present, under either spelling /proc/cpuinfo uses (avx512_vbmi is avx512vbmi)."""
    return all(n in flags() or n.replace("_", "") in flags() for n in names)


def isa() -> dict[str, bool]:
    """The instruction sets that matter for expert kernels, strongest first."""
    return {name: has(*need) for name, need in ISA.items()}


def describe() -> str:
    """The CPU in a few words: its model and strongest instruction set."""
    best = next((name for name, ok in isa().items() if ok), "no AVX2")
    return f"{_cpuinfo('model name') or 'unknown CPU'}, {best}"


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


def usable_cpus() -> list[int]:
    """Logical CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0))


def _topology(cpu: int, name: str) -> int:
    try:
        return int(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/{name}").read_text())
    except (OSError, ValueError):
        return cpu if name == "core_id" else 0


def node_of(cpu: int) -> int:
    found = list(Path(f"/sys/devices/system/cpu/cpu{cpu}").glob("node[0-9]*"))
    return int(found[0].name[4:]) if found else 0


def cores_by_node() -> dict[int, list[int]]:
    """One logical CPU per physical core this process may use, grouped by NUMA node. Expert
    kernels are bound by memory and by vector units, which hyper-threads share."""
    seen, nodes = set(), {}
    for cpu in usable_cpus():
        core = (_topology(cpu, "physical_package_id"), _topology(cpu, "core_id"))
        if core not in seen:
            seen.add(core)
            nodes.setdefault(node_of(cpu), []).append(cpu)
    return dict(sorted(nodes.items()))


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


def memory() -> tuple[int, int]:
    """Host memory in bytes: (total, available)."""
    import psutil

    vm = psutil.virtual_memory()
    return vm.total, vm.available


def report() -> list[tuple[str, str]]:
    """What `hybrid doctor` shows: (item, value) rows."""
    status, nodes, cores = kt(), cores_by_node(), expert_cores()
    total, available = memory()
    rows = [("CPU", _cpuinfo("model name") or "unknown")]
    rows += [(name, "yes" if ok else "no") for name, ok in isa().items()]
    rows += [("kt-kernel", status.version or "not installed"),
             ("kt-kernel build", f"{status.variant or '-'} (best this CPU runs: {native_variant() or 'none'})"),
             ("cores", f"{len(cores)} physical, {len(usable_cpus())} logical usable"),
             ("expert threads", f"{len(cores)}: kt-kernel on cores {cores[:-1]}, the caller's share on core {cores[-1]}"
              if len(cores) > 1 else f"1: kt-kernel on core {cores[0]}"),
             ("NUMA nodes", f"{len(nodes)}: " + "; ".join(f"node {n}: cores {c}" for n, c in nodes.items())),
             ("memory", f"{total / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available")]
    return rows
