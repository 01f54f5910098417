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
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    try:
        import torch
        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpu": cpu, "cores": psutil.cpu_count(logical=False), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "gpu": gpu, "python": platform.python_version()}


def save(name: str, figures: dict, markdown: str) -> Path:
    """Write results/<name>.json and results/<name>.md with machine, date and command."""
    RESULTS.mkdir(exist_ok=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
            "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}
    (RESULTS / f"{name}.json").write_text(json.dumps({**meta, **figures}, indent=2))
    m = meta["machine"]
    header = (f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB"
              f"{', ' + m['gpu'] if m['gpu'] else ', no GPU'}. Date: {meta['date']}. "
              f"Command: `{meta['command']}`\n\n")
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
