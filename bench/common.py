"""What the benchmarks share: the machine a figure was measured on, Kimi-shaped expert weights,
and saving figures with machine, date and command. Host read bandwidth, the floor of every CPU
figure, is `hybrid.measure.host_gbps` (the one `hybrid bench` uses)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

from placement import cpu_probe

ROOT = Path(__file__).resolve().parents[1]  # where `python -m bench.NAME` runs, and its children too
RESULTS = ROOT / "bench" / "results"
# Kimi K2's hidden size, routed experts' intermediate size, routed experts per layer and per token
KIMI_HIDDEN, KIMI_INTER, KIMI_EXPERTS, KIMI_TOP_K = 7168, 2048, 384, 8


def machine() -> dict:
    """The machine a figure was measured on, enough to tell an AVX-512 figure from an AVX2 one:
    CPU model and instruction sets, the kt-kernel build that loaded, torch and its thread counts."""
    import torch

    from hybrid.experts import cpu

    total, _ = cpu_probe.memory()
    kt = cpu.kt()
    return {"cpu": cpu_probe.model_name() or platform.machine(), "isa": [name for name, ok in cpu.isa().items() if ok],
            "cores": sum(map(len, cpu_probe.cores_by_node().values())), "ram_gib": round(total / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "kt_kernel": kt.version, "kt_kernel_build": kt.variant, "kt_kernel_usable": kt.reason or "yes"}


def command() -> str:
    """How this benchmark was started: `python -m bench.NAME ARGS`."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return " ".join(["python -m " + spec.name if spec else sys.argv[0]] + sys.argv[1:])


def kimi_experts(n: int, fmt: str = "int4", seed: int = 0):
    """`n` routed experts of Kimi K2's shapes (an ExpertWeights), each in its own memory: copies of
    one random expert, since speed does not depend on the values. `int4`: group-32 INT4 as Kimi
    ships them; `float`: bf16."""
    import torch

    from hybrid.experts.weights import ExpertWeights

    g, h, i = torch.Generator().manual_seed(seed), KIMI_HIDDEN, KIMI_INTER

    def copies(one: torch.Tensor) -> torch.Tensor:
        return one.expand(n, *one.shape).clone()

    shapes = ((i, h), (i, h), (h, i))  # gate, up, down: [out, in]
    if fmt == "float":
        return ExpertWeights("float", *(copies((torch.randn(o, k, generator=g) * 0.02).to(torch.bfloat16))
                                        for o, k in shapes))
    words = [copies(torch.randint(-2**31, 2**31 - 1, (o, k // 8), dtype=torch.int32, generator=g)) for o, k in shapes]
    scales = [copies((torch.rand(o, k // 32, generator=g) * 2e-3 + 1e-3).to(torch.bfloat16)) for o, k in shapes]
    return ExpertWeights("int4", *words, *scales)


def save(name: str, figures: dict, markdown: str) -> Path:
    """Write results/<name>.json and results/<name>.md with machine, date and command."""
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
            "command": command()}
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, **figures}, indent=2))
    m = meta["machine"]
    header = (f"Machine: {m['cpu']} ({', '.join(m['isa']) or 'no AVX2'}), {m['cores']} cores, {m['ram_gib']} GiB"
              f"{', ' + m['gpu'] if m['gpu'] else ', no GPU'}; torch {m['torch']} ({m['torch_cpu_capability']}, "
              f"{m['torch_threads']} threads), kt-kernel {m['kt_kernel']} `{m['kt_kernel_build']}` build. "
              f"Date: {meta['date']}. Command: `{meta['command']}`\n\n")
    path = RESULTS / f"{name}.md"
    path.write_text(header + markdown)
    return path


def markdown(table) -> str:
    """A rich Table as a markdown table under its title in bold."""
    cols = [list(c.cells) for c in table.columns]
    lines = [f"**{table.title}**", "", "| " + " | ".join(str(c.header) for c in table.columns) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(col[i]) for col in cols) + " |" for i in range(table.row_count)]
    return "\n".join(lines) + "\n"


def report(name: str, title: str, rows: list[tuple[str, str, str]], figures: dict, console) -> Path:
    """Print (measure, value, note) rows as a table and save them with the figures (see `save`)."""
    from rich.table import Table

    table = Table(title=title)
    for col, justify in (("measure", "left"), ("value", "right"), ("note", "left")):
        table.add_column(col, justify=justify)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    path = save(name, figures, markdown(table))
    console.print(f"saved {path} and {path.with_suffix('.json')}")
    return path
