"""What every benchmark records beside its figures: machine, date, command; and where it saves."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

import psutil

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    """The machine a figure was measured on, enough to tell an AVX-512 figure from an AVX2 one:
    CPU model and instruction sets, the kt-kernel build that loaded, torch and its thread counts."""
    import torch

    from hybrid.experts import cpu

    kt = cpu.kt()
    return {"cpu": cpu.describe().rsplit(", ", 1)[0], "isa": [name for name, ok in cpu.isa().items() if ok],
            "cores": psutil.cpu_count(logical=False), "logical_cpus": psutil.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "kt_kernel": kt.version, "kt_kernel_build": kt.variant, "kt_kernel_usable": kt.reason or "yes"}


def save(name: str, figures: dict, markdown: str) -> Path:
    """Write results/<name>.json and results/<name>.md with machine, date and command."""
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
            "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}
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
