"""One MoE layer of Kimi's shape on the CPU expert backends (our INT4 dot kernel, kt-kernel,
torch's int4 kernel): hidden 7168, intermediate 2048, 8 of 64 experts per token, for T = 1, 8, 64, 512 tokens, per backend / method and thread count.

Each row: ms per call (median), effective weight bandwidth (bytes of the experts the tokens touch,
in the form the method runs them, per second: in total and per thread) and TFLOP/s. Host read
bandwidth is measured in the same run with the same thread counts (torch `sum` over 1 GiB, threads
set by torch.set_num_threads); each T = 1 time is compared with its floor, the bytes of the chosen
experts over that bandwidth. "All cores" for kt-kernel means its pool on every core but one, and
the caller's share on that one. Each figure is the best of a few blocks of calls, preferring
blocks during which other processes used under 0.2 cores; what they used is recorded.

    python -m bench.experts [--threads 1,2] [--methods dot,int4_kgroup,torch,amx_int8,bf16,amx_int4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench.common import KIMI_HIDDEN, KIMI_INTER, KIMI_TOP_K, ROOT, kimi_experts, save
from hybrid.experts import cpu
from hybrid.experts.dot_backend import DotExperts
from hybrid.experts.torch_backend import PackedInt4Experts
from hybrid.experts.weights import ExpertWeights
from hybrid.measure import host_gbps

H, I, E, K = KIMI_HIDDEN, KIMI_INTER, 64, KIMI_TOP_K
TOKENS = (1, 8, 64, 512)
BYTES_PER_WEIGHT = {"dot": 0.5 + 2 / 32, "int4_kgroup": 0.5 + 2 / 32, "torch": 0.5 + 2 / 32, "amx_int8": 1.0, "amx_int4": 0.5, "bf16": 2.0}
BLOCKS = {1: (6, 0.2), 8: (3, 0.3), 64: (2, 0.5), 512: (1, 0.0)}  # blocks of calls, each at least this long


def _cpu_ticks() -> tuple[int, int, int]:
    """(all, idle, this process's) CPU ticks so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    me = os.times()
    return sum(v), v[3] + v[4], round((me.user + me.system) * os.sysconf("SC_CLK_TCK"))


def elsewhere(fn):
    """fn(), and the cores other processes used meanwhile."""
    all0, idle0, me0 = _cpu_ticks()
    out = fn()
    all1, idle1, me1 = _cpu_ticks()
    busy = all1 - all0 - (idle1 - idle0) - (me1 - me0)
    return out, max(0.0, busy / max(1, all1 - all0) * os.cpu_count())


def fastest_block(call, blocks: int, seconds: float, patience: float = 15.0) -> tuple[float, float]:
    """Median time of `call` in the best of `blocks` blocks (each at least `seconds` long and one
    call), and the cores other processes used meanwhile. A block during which they used 0.2 cores
    or more counts only if none was quieter; while none was, more blocks run, for `patience` s."""
    def block():
        times, end = [], time.perf_counter() + seconds
        while not times or time.perf_counter() < end:
            t = time.perf_counter()
            call()
            times.append(time.perf_counter() - t)
        return statistics.median(times)
    start = time.perf_counter()
    results = [elsewhere(block) for _ in range(blocks)]
    while min(load for _, load in results) >= 0.2 and time.perf_counter() - start < patience:
        results.append(elsewhere(block))
    ms, load = min(results, key=lambda r: (r[1] >= 0.2, r[0]))
    return ms, load


def backend(method: str, threads: int, weights: ExpertWeights):
    if method == "torch":
        return PackedInt4Experts(weights)
    if method == "dot":
        return DotExperts(weights)
    from hybrid.experts.kt.backend import KTExperts

    return KTExperts(weights, 0, method, threads, Path.home() / ".cache/hybrid/kt-bench")


def timed(be, tokens: int, g, threads: int, method: str) -> tuple[float, float]:
    """ms per call on fresh random routings (every call touches other experts), and the cores
    other processes used meanwhile."""
    routes = [(torch.randn(tokens, H, generator=g).to(torch.bfloat16),
               torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(tokens)]),
               torch.rand(tokens, K, generator=g)) for _ in range(8)]
    turn = iter(range(10**9))

    def call():
        be.submit(*routes[next(turn) % len(routes)])
        be.wait()

    torch_threads = torch.get_num_threads()
    if method in ("torch", "dot"):  # kernels on torch's threads
        torch.set_num_threads(threads)
    try:
        blocks, seconds = BLOCKS[tokens]
        if seconds:  # else the previous, smaller batch warmed up
            call()
        s, load = fastest_block(call, blocks, seconds)
    finally:
        torch.set_num_threads(torch_threads)
    return s * 1e3, load


def touched(tokens: int) -> float:
    """Expected distinct experts among `tokens` tokens choosing K of E at random."""
    return E * (1 - (1 - K / E) ** tokens)


def measure(method: str, thread_counts: list[int], host: dict[int, float]) -> list[dict]:
    """Every thread count and token count of one method (its own process: kt-kernel never frees
    a layer's weights, and float experts of this size are 5.6 GB)."""
    g = torch.Generator().manual_seed(0)
    weights = kimi_experts(E, "int4" if method in ("dot", "int4_kgroup", "torch") else "float")
    per_expert, rows = 3 * H * I * BYTES_PER_WEIGHT[method], []
    for threads in thread_counts:
        t = time.perf_counter()
        be = backend(method, threads, weights)
        load_s = time.perf_counter() - t
        for tokens in TOKENS:
            ms, load = timed(be, tokens, g, threads, method)
            gbps = touched(tokens) * per_expert / ms / 1e6
            floor = K * per_expert / host[threads] / 1e6 if tokens == 1 else None
            rows.append({"backend": be.name, "method": "int4" if method in ("torch", "dot") else method,
                         "kernel": getattr(be, "kernel", "int4pack"), "threads": threads, "tokens": tokens,
                         "ms": ms, "gbps": gbps, "gbps_per_thread": gbps / threads,
                         "tflops": tokens * K * 6 * H * I / ms / 1e9, "floor_ms": floor,
                         "x_floor": ms / floor if floor else None, "load_s": load_s, "other_load": load})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    all_cores = len(cpu.expert_cores())
    ap.add_argument("--threads", default=",".join(str(t) for t in sorted({1, all_cores})))
    ap.add_argument("--methods", default="dot,int4_kgroup,torch,amx_int8,bf16,amx_int4")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # method;host GB/s per thread count, as JSON
    args = ap.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    if args.child:
        method, host = args.child.split(";")
        print("ROWS", json.dumps(measure(method, thread_counts, {int(k): v for k, v in json.loads(host).items()})))
        return
    methods = [m for m in args.methods.split(",") if m in ("torch", "dot") or cpu.kt().usable]
    console, start = Console(), time.time()
    host = {t: host_gbps(t) for t in thread_counts}
    rows = []
    for method in methods:
        with console.status(f"{method}: {', '.join(map(str, thread_counts))} threads, T = {TOKENS}"):
            child = subprocess.run([sys.executable, "-m", __spec__.name, "--threads", args.threads,
                                    "--child", f"{method};{json.dumps(host)}"], capture_output=True, text=True,
                                   cwd=ROOT)
        if child.returncode:
            raise SystemExit(f"{method} failed:\n{child.stderr[-3000:]}")
        rows += json.loads(next(line[5:] for line in child.stdout.splitlines() if line.startswith("ROWS ")))
    one = {(r["backend"], r["method"]): r["ms"] for r in rows if r["tokens"] == 1 and r["threads"] == 1}
    speedup = {f"{r['backend']} {r['method']}": r["ms"] / one[r["backend"], r["method"]] for r in rows
               if r["tokens"] == 1 and r["threads"] == max(thread_counts) and (r["backend"], r["method"]) in one}

    table = Table(title=f"One Kimi-shaped MoE layer (H {H}, I {I}, {K} of {E} experts), {time.time() - start:.0f} s")
    cols = ("backend", "method", "threads", "T", "ms", "GB/s", "GB/s/thread", "TFLOP/s", "floor ms", "x floor")
    for c in cols:
        table.add_column(c, justify="right")
    lines = []
    for r in rows:
        cells = [r["backend"], r["method"], str(r["threads"]), str(r["tokens"]), f"{r['ms']:.2f}", f"{r['gbps']:.1f}",
                 f"{r['gbps_per_thread']:.1f}", f"{r['tflops']:.3f}",
                 f"{r['floor_ms']:.2f}" if r["floor_ms"] else "", f"{r['x_floor']:.2f}" if r["x_floor"] else ""]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console.print(table)
    host_line = ", ".join(f"{host[t]:.1f} GB/s with {t} thread{'s' * (t > 1)}" for t in thread_counts)
    ratio_line = ", ".join(f"{m} {v:.2f}" for m, v in speedup.items())
    console.print(f"host read bandwidth: {host_line}")
    console.print(f"T = 1 with {max(thread_counts)} threads over 1 thread: {ratio_line}")
    busy = max(r["other_load"] for r in rows)
    md = ("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "\n".join(lines) +
          f"\n\nHost read bandwidth (torch `sum` over 1 GiB): {host_line}. "
          f"T = 1 time with {max(thread_counts)} threads over 1 thread: {ratio_line}. "
          f"Other processes used up to {busy:.2f} cores during a measurement.\n")
    path = save("experts", {"host_gbps": host, "rows": rows, "t1_all_over_one": speedup,
                            "kt": {"version": cpu.kt().version, "build": cpu.kt().variant},
                            "seconds": time.time() - start}, md)
    console.print(f"saved {path}")


if __name__ == "__main__":
    main()
