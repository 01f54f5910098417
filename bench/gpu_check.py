"""The GPU checks, in one script under 8 minutes: correctness of the GPU paths against the CPU
path and of decode attention split between the GPU's and the host's KV tiers, then speed with the
mini preset and with single layers of Kimi's exact shapes, each figure beside its floor. Skips
cleanly (exit 0, says so, saves nothing) where there is no CUDA device.

    python -m bench.gpu_check [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from bench.common import KIMI_EXPERTS, KIMI_HIDDEN, KIMI_INTER, KIMI_TOP_K, kimi_experts, save
from hybrid.measure import gemm_tflops, host_gbps
from placement.memory import STREAM_GROUP

console = Console()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


def pcie_bandwidth() -> float:
    x = torch.empty(2**28, dtype=torch.uint8).pin_memory()
    y = torch.empty_like(x, device="cuda")
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    return 10 * x.numel() / (time.perf_counter() - t) / 1e9


def correctness(tiny: Path) -> list[tuple[str, float]]:
    """float32 logits of the GPU placements against the same model on the CPU (in bf16 the two
    differ by 7-9% on the tiny preset: rounding flips some tokens' expert choice)."""
    from hybrid.api import load_model
    from hybrid.offload.layout import Layout

    ids = torch.randint(0, 1280, (64,), generator=torch.Generator().manual_seed(0))
    cpu = load_model(tiny, Layout.on("cpu"), dtype=torch.float32).logits(ids)
    cases = {"all dense on GPU": {}, "50% experts hot": {"hot_experts": {1: list(range(8)), 2: list(range(8))}},
             "streamed prefill": {"stream_threshold": 16}}
    out = []
    for name, kw in cases.items():
        gpu = load_model(tiny, Layout.on("cuda:0", **kw), dtype=torch.float32).logits(ids)
        out.append((name, rel(gpu, cpu)))
    return out


def split_kv(tiny: Path) -> float:
    """Greedy decode on the GPU in float32 with a device tier of 4 pages (the rest of the cache in
    pinned host RAM, attended to by the CPU and merged) against every page on the GPU: the largest
    logit difference over every step."""
    from hybrid.api import load_model
    from hybrid.engine import Engine, EngineConfig, SamplingParams
    from hybrid.offload.layout import Layout

    model = load_model(tiny, Layout.on("cuda:0"), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 1280, (n,), generator=g).tolist() for n in (70, 150)]
    runs = []
    for host in (0, 4096 - 64):
        engine = Engine(model, config=EngineConfig(kv_cache_tokens=4096, host_kv_tokens=host))
        steps, run = [], engine.runner.run
        engine.runner.run = lambda scheduled: steps.append(run(scheduled)) or steps[-1]
        engine.generate(prompts, SamplingParams(max_tokens=32, temperature=0.0))
        runs.append(steps)
    return max(float((a - b).abs().max()) for a, b in zip(*runs))


def time_layer(ex, hidden: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, reps: int) -> float:
    ex.submit(hidden, ids, w)
    ex.wait()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        ex.submit(hidden, ids, w)
        ex.wait()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def kimi_decode(weights, host_gbps: float, threads: int) -> list[dict]:
    """T = 1 decode of one Kimi layer with 0/10/50% of experts hot: ms beside its floor."""
    from hybrid.experts.choice import make_backend
    from hybrid.experts.options import ExpertOptions
    from hybrid.offload.device_experts import DeviceExperts
    from hybrid.offload.hybrid_experts import HybridExperts

    rows = []
    per_expert = weights.nbytes() / weights.num_experts
    cpu = make_backend(weights, 1, ExpertOptions(threads=threads))
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, KIMI_HIDDEN, generator=g).to(torch.bfloat16).cuda()
    w = torch.rand(1, KIMI_TOP_K, generator=g).float().cuda()
    for share in (0.0, 0.1, 0.5):
        n_hot = int(KIMI_EXPERTS * share)
        hot = DeviceExperts(weights, list(range(n_hot)), "cuda:0") if n_hot else None
        ex = HybridExperts(1, cpu, "cuda:0", hot=hot)
        ids = torch.randperm(KIMI_EXPERTS, generator=g)[:KIMI_TOP_K][None].cuda()
        cold = int((ids >= n_hot).sum())
        ms = time_layer(ex, hidden, ids, w, 20) * 1e3
        floor = cold * per_expert / (host_gbps * 1e9) * 1e3
        rows.append({"case": f"decode T=1, {int(share * 100)}% hot", "ms": ms, "floor_ms": floor})
        del hot, ex
        torch.cuda.empty_cache()
    return rows


def kimi_prefill(weights, host_gbps: float, pcie_gbps: float, cpu_tflops: float, threads: int,
                 sizes: tuple[int, ...]) -> list[dict]:
    """Prefill of one Kimi layer: CPU experts (floor: FLOPs at the CPU's GEMM peak, or the layer's
    bytes at host bandwidth) against streaming every expert to the GPU (floor: the layer's bytes
    over pinned PCIe)."""
    from hybrid.experts.choice import make_backend
    from hybrid.experts.options import ExpertOptions
    from hybrid.offload.hybrid_experts import HybridExperts
    from hybrid.offload.prefill_stream import ExpertStreamer

    per_expert = weights.nbytes() // weights.num_experts
    streamer = ExpertStreamer("cuda:0", 2 * STREAM_GROUP * per_expert)
    streamer.add(1, weights, list(range(weights.num_experts)))
    cpu = make_backend(streamer.layers[1], 1, ExpertOptions(threads=threads))
    flops_per_pick = 3 * 2 * KIMI_HIDDEN * KIMI_INTER
    rows = []
    for tokens in sizes:
        g = torch.Generator().manual_seed(tokens)
        hidden = torch.randn(tokens, KIMI_HIDDEN, generator=g).to(torch.bfloat16).cuda()
        ids = torch.stack([torch.randperm(KIMI_EXPERTS, generator=g)[:KIMI_TOP_K] for _ in range(tokens)]).cuda()
        w = torch.rand(tokens, KIMI_TOP_K, generator=g).cuda()
        for name, threshold in (("CPU experts", None), ("streamed to GPU", 1)):
            ex = HybridExperts(1, cpu, "cuda:0", streamer=streamer, stream_threshold=threshold)
            ms = time_layer(ex, hidden, ids, w, 2) * 1e3
            # the CPU computes at its GEMM peak and reads the layer once; streaming moves the layer
            # over PCIe (the GPU's compute, ~1 ms at 4,096 tokens, hides under the copy)
            floor = (max(tokens * KIMI_TOP_K * flops_per_pick / (cpu_tflops * 1e12),
                         weights.nbytes() / (host_gbps * 1e9)) if threshold is None
                     else weights.nbytes() / (pcie_gbps * 1e9)) * 1e3
            rows.append({"case": f"prefill {tokens} tokens, {name}", "ms": ms, "floor_ms": floor,
                         "tok_s": tokens / ms * 1e3})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller prompts (512, 4096)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        console.print("no CUDA device: the GPU checks were skipped (nothing measured, nothing saved)")
        return
    from hybrid.default_model import preset_model

    threads = max(1, (torch.get_num_threads() or 2) - 1)
    host = host_gbps(threads)
    pcie = pcie_bandwidth()
    console.print(f"{torch.cuda.get_device_name(0)}: host read {host:.1f} GB/s ({threads} threads), "
                  f"pinned H2D {pcie:.1f} GB/s")
    checks = correctness(preset_model("tiny"))
    checks.append(("KV split between GPU and host tiers (max abs logit diff)", split_kv(preset_model("tiny"))))
    console.print(checks)
    weights = kimi_experts(KIMI_EXPERTS)
    rows = kimi_decode(weights, host, threads)
    console.print(rows)
    sizes = (512, 4096) if args.quick else (512, 4096, 16384)
    peak = max(gemm_tflops().values())
    rows += kimi_prefill(weights, host, pcie, peak, threads, sizes)

    table = Table(title="GPU checks")
    for col in ("case", "ms", "floor ms", "ratio to floor"):
        table.add_column(col, justify="right")
    for name, err in checks:
        table.add_row(f"correctness: {name}", f"{err:.2e}", "", "ok" if err < (1e-4 if "split" in name else 1e-3)
                      else "FAIL")
    for r in rows:
        table.add_row(r["case"], f"{r['ms']:.2f}", f"{r['floor_ms']:.2f}", f"{r['ms'] / r['floor_ms']:.2f}x")
    console.print(table)
    md = "| case | ms | floor ms | ratio |\n|---|---|---|---|\n" + "".join(
        f"| {r['case']} | {r['ms']:.2f} | {r['floor_ms']:.2f} | {r['ms'] / r['floor_ms']:.2f}x |\n" for r in rows)
    save("gpu_check", {"host_gbps": host, "pcie_gbps": pcie, "correctness": dict(checks), "rows": rows}, md)


if __name__ == "__main__":
    main()
