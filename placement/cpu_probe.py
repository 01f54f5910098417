"""This machine's CPU as the OS shows it: its model, instruction-set flags, host memory, and the
physical cores this process may run on, node by node.

The one probe of the CPU: the planner's `hardware.detect` and the runtime's expert threads both
read it, so a plan for this machine counts the cores the runtime will use.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path


@functools.cache
def _cpuinfo(field: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def model_name() -> str:
    return _cpuinfo("model name")


def flags() -> frozenset[str]:
    return frozenset(_cpuinfo("flags").split())


def has(*names: str) -> bool:
    """Every flag present, under either spelling /proc/cpuinfo uses (avx512_vbmi is avx512vbmi)."""
    return all(n in flags() or n.replace("_", "") in flags() for n in names)


def bf16_math() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AVX512-BF16, which AMX CPUs have too (elsewhere
    oneDNN emulates it, and bf16 GEMMs run far slower than fp32's)."""
    return has("avx512_bf16")


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


def memory() -> tuple[int, int]:
    """Host memory in bytes: (total, available)."""
    import psutil

    vm = psutil.virtual_memory()
    return vm.total, vm.available
