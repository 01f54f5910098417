"""Loading a checkpoint: wall time and peak resident memory against the checkpoint's size on disk.

The model is loaded in a fresh process so its peak RSS is the loader's alone. Target: peak RSS
at most 1.3x the bytes on disk (the weights are held once; no second full copy).

    python -m bench.load [--preset mini] [--folder DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.common import markdown, save

CHILD = """
import json, sys, time
from hybrid.api import load_model
t = time.perf_counter()
m = load_model(sys.argv[1])
wall = time.perf_counter() - t
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))  # kB, this process only
print(json.dumps({"wall_s": wall, "peak_rss": hwm * 1024,
                  "experts": m.moe_experts()[-1].cpu.name}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--folder", type=Path, default=None)
    args = ap.parse_args()
    console = Console()
    folder = args.folder or Path.home() / ".cache/hybrid/models" / args.preset
    if not folder.exists():
        from hybrid.model.synthetic import write_checkpoint
        t = time.perf_counter()
        with console.status(f"writing the {args.preset} checkpoint to {folder}") as status:
            write_checkpoint(folder, args.preset, progress=lambda msg: status.update(f"writing {args.preset}: {msg}"))
        console.print(f"wrote {folder} in {time.perf_counter() - t:.1f} s")
    disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, check=True)
    r = json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))
    ratio = r["peak_rss"] / disk
    table = Table(title=f"Loading the {args.preset} preset")
    for col in ("checkpoint on disk", "load wall time", "peak RSS", "RSS / disk", "target", "expert backend"):
        table.add_column(col, justify="right")
    row = [f"{disk / 2**30:.2f} GiB", f"{r['wall_s']:.1f} s", f"{r['peak_rss'] / 2**30:.2f} GiB", f"{ratio:.2f}x",
           "<= 1.30x", r["experts"]]
    table.add_row(*row)
    console.print(table)
    save(f"load_{args.preset}", {"disk_bytes": disk, **r, "rss_over_disk": ratio}, markdown(table))


if __name__ == "__main__":
    main()
