"""Decode speed against context length with the KV cache's two tiers, each beside its floor measured
in the same run.

    python -m bench.kv_tiers [--preset mini] [--contexts 2048 8192 32768 65536] [--device-tokens 1024]

Per context, one decode step (the best of a few) of one sequence whose cache is: all in one tier;
split, the newest `--device-tokens` on the attention device and the rest in the host tier (attention
split and merged); split and stored as FP8. The cache is filled with random latents (a decode
step's time does not depend on their values, and prefilling 64K tokens would take hours here).
Without a GPU both tiers are host memory: the split's cost is its bookkeeping and the merge.

Floor of a step = max(bytes it must read / host read bandwidth, attention FLOPs / GEMM peak):
bytes are the weights a decode step reads as held (hybrid/breakdown.py) plus the context's
latents as stored; FLOPs are the absorbed attention's over the context. Bandwidth (torch sum over
1 GiB) and bf16 GEMM peak are measured before and after the runs; the floor takes the best.
"""

from __future__ import annotations

import argparse

import hybrid  # noqa: F401  (first: it sets OpenMP's spin before torch loads)
from hybrid import breakdown

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.common import markdown, save  # noqa: E402
from hybrid.api import HybridModel, load_model  # noqa: E402
from hybrid.default_model import preset_model  # noqa: E402
from hybrid.measure import best_seconds, gemm_tflops, host_gbps  # noqa: E402
from hybrid.model.batch import ForwardBatch  # noqa: E402

LAYOUTS = (("one tier", None, "bf16"), ("two tiers", True, "bf16"), ("two tiers, fp8", True, "fp8"))


def step_seconds(hm: HybridModel, context: int, device_tokens: int | None, kv_dtype: str) -> float:
    """Best time of one decode step at `context`, the cache filled with random latents."""
    cfg = hm.config
    cache = hm.new_cache(context + 1, device_tokens, kv_dtype)
    g = torch.Generator().manual_seed(0)
    for layer in range(cfg.num_hidden_layers):
        for start in range(0, context, 8192):
            slots = torch.arange(start, min(context, start + 8192))
            cache.write(layer, slots, torch.randn(len(slots), cfg.kv_lora_rank, generator=g),
                        torch.randn(len(slots), cfg.qk_rope_head_dim, generator=g))
    batch = ForwardBatch(torch.tensor([1]), torch.tensor([context]), [1], [torch.arange(context + 1)], cache.host_from)
    return best_seconds(lambda: hm.decoder(batch, cache), 3)


def floor_seconds(hm: HybridModel, context: int, kv_dtype: str, gbps: float, tflops: float) -> tuple[float, float]:
    """(read floor, compute floor) of one decode step at `context`."""
    cfg = hm.config
    weights = sum(breakdown.decode_floor(hm, 0, gbps).values())
    values = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    kv = context * cfg.num_hidden_layers * (values + 8 if kv_dtype == "fp8" else 2 * values)
    flops = 2 * cfg.num_hidden_layers * cfg.num_attention_heads * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) * context
    return weights + kv / (gbps * 1e9), flops / (tflops * 1e12)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768, 65536])
    ap.add_argument("--device-tokens", type=int, default=1024)
    args = ap.parse_args()
    console = Console()
    hm = load_model(preset_model(args.preset, console.print))
    with console.status("measuring host bandwidth and GEMM peak"):
        bws, peaks = [host_gbps()], [gemm_tflops()]
    rows = []
    for context in args.contexts:
        for name, split, kv_dtype in LAYOUTS:
            with console.status(f"context {context:,}: {name}"):
                rows.append({"context": context, "layout": name, "kv_dtype": kv_dtype,
                             "step_s": step_seconds(hm, context, args.device_tokens if split else None, kv_dtype)})
    bws.append(host_gbps())
    peaks.append(gemm_tflops())
    bw = max(bws)
    tflops = max(v for p in peaks for k, v in p.items() if "bf16" in k)
    table = Table(title=f"decode against context, {args.preset}, two tiers split at the newest "
                        f"{args.device_tokens:,} tokens (host read {bw:.1f} GB/s, bf16 GEMM {tflops:.3f} TFLOP/s)")
    for col in ("context", "KV layout", "ms / step", "tok/s", "read floor ms", "compute floor ms", "x floor"):
        table.add_column(col, justify="right")
    for r in rows:
        read, compute = floor_seconds(hm, r["context"], r["kv_dtype"], bw, tflops)
        r.update(read_floor_s=read, compute_floor_s=compute)
        table.add_row(f"{r['context']:,}", r["layout"], f"{r['step_s'] * 1e3:,.1f}", f"{1 / r['step_s']:,.2f}",
                      f"{read * 1e3:,.1f}", f"{compute * 1e3:,.1f}", f"{r['step_s'] / max(read, compute):.2f}")
    console.print(table)
    figures = {"preset": args.preset, "device_tokens": args.device_tokens, "host_gbps": [round(b, 2) for b in bws],
               "gemm_tflops": peaks, "threads": torch.get_num_threads(), "rows": rows}
    path = save(f"kv_tiers_{args.preset}", figures, markdown(table))
    console.print(f"saved {path} and {path.with_suffix('.json')}")


if __name__ == "__main__":
    main()
