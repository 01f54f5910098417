"""What a machine has: GPUs, CPU cores and instruction sets, NUMA nodes, host RAM.

`detect()` reads this machine (`cpu_probe`, torch or nvidia-smi); `describe()`
and `Hardware.load()` build one by hand, so a plan can be made for a machine you do not have.
Sizes are binary: "24GB" is 24 GiB, as nvidia-smi and free count them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from placement import cpu_probe
from placement.errors import PlacementError

GIB = 1 << 30
# strongest first; each implies the ones after it; with the CPU flags that show each
ISA_FLAGS = {"amx": ("amx_tile", "amx_int8", "amx_bf16"), "avx512_bf16": ("avx512_bf16",),
             "avx512": ("avx512f", "avx512bw"), "avx2": ("avx2",)}
ISA_LEVELS = tuple(ISA_FLAGS)


class HardwareError(PlacementError):
    """A machine description or option the planner cannot read."""


class GPU(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "GPU"
    memory_gib: float = Field(gt=0)
    free_gib: float | None = None  # what was free when detected; plans use it when set

    @property
    def budget_bytes(self) -> int:
        return int((self.memory_gib if self.free_gib is None else self.free_gib) * GIB)


class CPU(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "CPU"
    cores: int = Field(ge=1)  # physical cores
    numa_nodes: int = Field(default=1, ge=1)
    isa: list[str] = Field(default_factory=list)  # subset of ISA_LEVELS
    # The CPU expert backend that proved itself on this machine (`hybrid doctor` shows it); unset
    # for a described machine, where the INT4 dot kernel (INT4 checkpoints) or kt-kernel is
    # assumed wherever there is AVX2.
    expert_backend: Literal["dot", "kt", "torch"] | None = None

    def has(self, isa: str) -> bool:
        return isa in self.isa

    def pools(self, threads: int) -> int:
        """kt-kernel pools the runtime makes for `threads` expert threads: one per NUMA node its
        compute threads run on (all threads but the last, which drives them; cores taken node by
        node)."""
        compute = max(1, threads - 1)
        return min(self.numa_nodes, -(-compute // -(-self.cores // self.numa_nodes)))


class Measured(BaseModel):
    """Figures measured on the machine; each one set replaces the cost model's default."""

    model_config = ConfigDict(extra="forbid")
    host_gbps: float | None = None  # host memory read bandwidth, all threads
    pcie_gbps: float | None = None  # pinned host-to-device copy
    gpu_gbps: float | None = None  # GPU memory bandwidth
    gpu_tflops: float | None = None  # GPU dense bf16
    cpu_decode_gbps_per_thread: float | None = None  # expert weights one kernel thread streams at T = 1
    cpu_prefill_tflops: float | None = None  # expert FLOP/s of all threads on long prompts


class Hardware(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpus: list[GPU] = Field(default_factory=list)
    cpu: CPU
    ram_gib: float = Field(gt=0)
    measured: Measured = Field(default_factory=Measured)

    @property
    def ram_bytes(self) -> int:
        return int(self.ram_gib * GIB)

    def summary(self) -> str:
        gpus = ", ".join(f"{g.name} {g.memory_gib:g} GiB" for g in self.gpus) or "no GPU"
        isa = "/".join(self.cpu.isa) or "no SIMD"
        return (f"{gpus}; {self.cpu.cores} cores, {self.cpu.numa_nodes} NUMA node(s), {isa}; "
                f"{self.ram_gib:g} GiB RAM")

    @classmethod
    def load(cls, path: str | Path) -> Hardware:
        """A hand-written machine description (YAML; sizes as numbers of GiB or strings like 1TB)."""
        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
            gpus = [GPU(name=g.get("name", "GPU"), memory_gib=parse_gib(g["memory"]))
                    if isinstance(g, dict) else gpu_from_spec(str(g)) for g in d.get("gpus", [])]
            c = d["cpu"]
            cpu = CPU(name=c.get("name", "CPU"), cores=c["cores"], numa_nodes=c.get("numa_nodes", 1),
                      isa=isa_from(c.get("isa", [])))
            return cls(gpus=gpus, cpu=cpu, ram_gib=parse_gib(d["ram"]), measured=Measured(**d.get("measured", {})))
        except KeyError as e:
            raise HardwareError(f"{path}: missing {e.args[0]!r} (format in docs/placement.md)") from None
        except (OSError, yaml.YAMLError) as e:
            raise HardwareError(f"{path}: cannot read a machine description ({e})") from None
        except ValidationError as e:
            err = e.errors()[0]
            raise HardwareError(f"{path}: {'.'.join(map(str, err['loc']))} = {err.get('input')!r}: {err['msg']} "
                                "(format in docs/placement.md)") from None


# name fragment -> (memory GiB, memory GB/s, dense bf16 TFLOP/s, pinned PCIe GB/s); datasheet figures
GPU_TABLE: dict[str, tuple[float, float, float, float]] = {
    "h200": (139.8, 4800, 989, 55),
    "h100 pcie": (79.6, 2000, 756, 55),
    "h100": (79.6, 3350, 989, 55),
    "a100": (79.2, 2039, 312, 25),
    "rtx pro 6000": (94.97, 1792, 500, 55),
    "5090": (31.4, 1792, 209, 55),
    "4090": (23.99, 1008, 165, 25),
    "3090": (23.69, 936, 71, 25),
    "l40s": (44.4, 864, 362, 25),
    "6000 ada": (47.5, 960, 364, 25),
}
UNKNOWN_GPU = (0.0, 1000, 100, 25)


def gpu_figures(name: str) -> tuple[float, float, float, float]:
    n = name.lower()
    return next((v for k, v in GPU_TABLE.items() if k in n), UNKNOWN_GPU)


def parse_gib(size: str | float) -> float:
    """'24GB', '24GiB', '1TB', '512G', 80 -> GiB (binary units throughout)."""
    if isinstance(size, (int, float)):
        return float(size)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)i?B?\s*", size, re.IGNORECASE)
    if not m:
        raise HardwareError(f"cannot read size {size!r}; write it like 24GB, 768GB or 1TB")
    scale = {"": 1.0, "K": 1 / (1 << 20), "M": 1 / 1024, "G": 1.0, "T": 1024.0}[m.group(2).upper()]
    try:
        gib = float(m.group(1)) * scale
    except ValueError:
        raise HardwareError(f"cannot read size {size!r}; write it like 24GB, 768GB or 1TB") from None
    if gib <= 0:
        raise HardwareError(f"size {size!r} is not above zero; write it like 24GB, 768GB or 1TB")
    return gib


def gpu_from_spec(spec: str) -> GPU:
    """'24GB', 'RTX 4090' (memory from the table) or 'RTX 4090=24GB'."""
    name, _, size = spec.rpartition("=") if "=" in spec else ("", "", spec)
    if not name and gpu_figures(spec)[0]:
        return GPU(name=spec, memory_gib=gpu_figures(spec)[0])
    try:
        return GPU(name=name or "GPU", memory_gib=parse_gib(size))
    except HardwareError:
        raise HardwareError(f"cannot read GPU {spec!r}; write 24GB, a known model such as 4090 or h100, "
                            "or NAME=SIZE") from None


def isa_from(names: list[str] | str) -> list[str]:
    """Expand the strongest level given ('amx' implies avx512_bf16, avx512, avx2)."""
    names = [names] if isinstance(names, str) else names
    for n in names:
        if n not in ISA_LEVELS:
            raise HardwareError(f"unknown ISA {n!r}; use one of {', '.join(ISA_LEVELS)}")
    top = min((ISA_LEVELS.index(n) for n in names), default=len(ISA_LEVELS))
    return list(ISA_LEVELS[top:])


def describe(gpus: list[str] = (), ram: str = "64GB", cores: int = 8, numa: int = 1,
             isa: str | list[str] = "avx2", cpu_name: str = "CPU") -> Hardware:
    return Hardware(gpus=[gpu_from_spec(g) for g in gpus], ram_gib=parse_gib(ram),
                    cpu=CPU(name=cpu_name, cores=cores, numa_nodes=numa, isa=isa_from(isa)))


def resolve(file: str | Path | None = None, gpus: list[str] = (), no_gpu: bool = False, ram: str | None = None,
            cores: int | None = None, numa: int | None = None, isa: str | None = None, **measured) -> Hardware:
    """The machine to plan for: a description file, else this machine with any part replaced."""
    for name, value in (("cores", cores), ("numa", numa), *measured.items()):
        if value is not None and value <= 0:
            raise HardwareError(f"{name} = {value}: must be above zero")
    hw = Hardware.load(file) if file else detect()
    changed = {k: v for k, v in (("cores", cores), ("numa_nodes", numa),
                                 ("isa", None if isa is None else isa_from(isa))) if v is not None}
    cpu = hw.cpu.model_copy(update=changed | ({"name": "CPU"} if changed else {}))
    if cpu.numa_nodes > cpu.cores:
        raise HardwareError(f"{cpu.numa_nodes} NUMA nodes for {cpu.cores} cores: give at most one node per core "
                            "(--numa, --cores)")
    figures = hw.measured.model_copy(update={k: v for k, v in measured.items() if v is not None})
    return Hardware(gpus=[] if no_gpu else [gpu_from_spec(g) for g in gpus] or hw.gpus, cpu=cpu,
                    ram_gib=parse_gib(ram) if ram else hw.ram_gib, measured=figures)


def from_this_machine(hw: Hardware, file: str | Path | None = None, gpus: list[str] = (), no_gpu: bool = False,
                      ram: str | None = None, cores: int | None = None, numa: int | None = None,
                      isa: str | None = None) -> list[str]:
    """The facts of `hw` (as `resolve` made it from the same arguments) that were read from this
    machine rather than given, in words, each with the option that replaces it."""
    if file:
        return []
    facts = []
    if not gpus and not no_gpu:
        names = ", ".join(f"{g.name} {g.memory_gib:g} GiB" for g in hw.gpus) or "none"
        facts.append(f"GPUs {names} (--gpu, --no-gpu)")
    if ram is None:
        facts.append(f"{hw.ram_gib:g} GiB RAM (--ram)")
    if cores is None:
        facts.append(f"{hw.cpu.cores} cores (--cores)")
    if numa is None:
        facts.append(f"{hw.cpu.numa_nodes} NUMA node(s) (--numa)")
    if isa is None:
        facts.append(f"instruction set {hw.cpu.isa[0] if hw.cpu.isa else 'below avx2'} (--isa)")
    if hw.cpu.expert_backend:
        facts.append(f"expert backend {hw.cpu.expert_backend} (as `hybrid doctor` shows)")
    return facts


def detect() -> Hardware:
    """This machine, as far as it can be read without root: the CPU as this process may use it."""
    nodes = cpu_probe.cores_by_node()
    isa = [level for level, need in ISA_FLAGS.items() if cpu_probe.has(*need)]
    cpu = CPU(name=cpu_probe.model_name() or "CPU", cores=sum(map(len, nodes.values())), numa_nodes=len(nodes),
              isa=isa)
    return Hardware(gpus=_gpus(), cpu=cpu, ram_gib=round(cpu_probe.memory()[0] / GIB, 2))


def _gpus() -> list[GPU]:
    try:
        import torch

        if torch.cuda.is_available():
            gpus = []
            for i in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(i)
                gpus.append(GPU(name=torch.cuda.get_device_name(i), memory_gib=round(total / GIB, 2),
                                free_gib=round(free / GIB, 2)))
            return gpus
    except ImportError:
        pass
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.free",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, total, free = (x.strip() for x in line.split(","))
        gpus.append(GPU(name=name, memory_gib=round(float(total) / 1024, 2), free_gib=round(float(free) / 1024, 2)))
    return gpus
