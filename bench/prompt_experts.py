"""A prompt's routed experts on the dot backend: its INT4 x int8 dot products against its bf16 GEMMs
on tiles dequantized from the same weights (hybrid/experts/dot_backend.py), by tokens per expert,
at `mini`'s expert size (64 experts of hidden 2048, intermediate 1024) and at Kimi's (hidden 7168,
intermediate 2048; 48 of its 384 experts, enough for the tokens here), 8 experts per token.

Each call takes fresh random routes, as each prompt brings its own, so that no GEMM shape is met
twice by chance; the two ways take turns, the best of 3 each. The floor is the layer's FLOPs over
oneDNN's bf16 GEMM peak measured in the same run (`hybrid.measure.gemm_tflops`). This is where
`DOT_GEMM_MIN_TOKENS` (placement/model_spec.py) comes from: from that many pairs an expert runs as
GEMMs, where the CPU multiplies bf16 in hardware.

    python -m bench.prompt_experts [--per-expert 16,32,64,128,256]
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from bench.common import KIMI_HIDDEN, KIMI_INTER, KIMI_TOP_K, markdown, save
from hybrid.experts.dot_backend import DotExperts
from hybrid.experts.weights import ExpertWeights
from hybrid.measure import gemm_tflops
from placement.cpu_probe import bf16_math

SIZES = {"mini": (64, 2048, 1024), "kimi": (48, KIMI_HIDDEN, KIMI_INTER)}  # experts, hidden, intermediate


def experts(e: int, h: int, i: int, g: torch.Generator) -> ExpertWeights:
    """Random INT4 experts, group 32, in the checkpoint's form (speed does not depend on the values)."""
    shapes = ((i, h), (i, h), (h, i))
    words = [torch.randint(-2**31, 2**31 - 1, (e, o, k // 8), dtype=torch.int32, generator=g) for o, k in shapes]
    scales = [(torch.rand(e, o, k // 32, generator=g) * 2e-3 + 1e-3).to(torch.bfloat16) for o, k in shapes]
    return ExpertWeights("int4", *words, *scales)


def in_turns(backend: DotExperts, tokens: int, g: torch.Generator, rounds: int = 3) -> dict[bool, float]:
    """Seconds of one call with the GEMMs off and on, the best of `rounds` each, fresh routes each call."""
    e, h = backend.shape[:2]
    best = {False: float("inf"), True: float("inf")}
    for _ in range(rounds + 1):
        for gemms in best:
            x = torch.randn(tokens, h, generator=g).bfloat16()
            ids = torch.stack([torch.randperm(e, generator=g)[:KIMI_TOP_K] for _ in range(tokens)])
            backend.gemms = gemms
            start = time.perf_counter()
            backend.forward(x, ids, torch.rand(tokens, KIMI_TOP_K, generator=g))
            best[gemms] = min(best[gemms], time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-expert", default="16,32,64,128,256", help="mean (token, slot) pairs an expert gets")
    args = ap.parse_args()
    console = Console()
    if not bf16_math():
        raise SystemExit("this CPU has no bf16 instructions: the dot backend keeps its dot products for prompts here")
    peak = gemm_tflops()
    best = max(peak.values())
    console.print(f"GEMM peaks (TFLOP/s): {', '.join(f'{k} {v:.3f}' for k, v in peak.items())}")
    table = Table(title="a prompt's routed experts: dot products against bf16 GEMMs, fresh routes each call")
    for col in ("size", "pairs / expert", "tokens", "dot ms", "GEMMs ms", "dot TFLOP/s", "GEMMs TFLOP/s",
                "GEMMs x floor", "GEMMs / dot"):
        table.add_column(col, justify="right")
    rows, g = [], torch.Generator().manual_seed(0)
    for name, (e, h, i) in SIZES.items():
        with console.status(f"{name}: reordering the weights for the dot kernel"):
            backend = DotExperts(experts(e, h, i, g), "avx512_vnni", gemms=True)
        backend.gemm_min_tokens = 1  # every expert the call's way, whatever its count
        for per in (int(p) for p in args.per_expert.split(",")):
            tokens = per * e // KIMI_TOP_K
            with console.status(f"{name}: {tokens} tokens, {per} pairs an expert"):
                s = in_turns(backend, tokens, g)
            flops = 2 * 3 * h * i * tokens * KIMI_TOP_K
            row = {"size": name, "pairs_per_expert": per, "tokens": tokens, "dot_ms": s[False] * 1e3,
                   "gemms_ms": s[True] * 1e3, "dot_tflops": flops / s[False] / 1e12,
                   "gemms_tflops": flops / s[True] / 1e12, "gemms_x_floor": s[True] / (flops / (best * 1e12)),
                   "gemms_over_dot": s[False] / s[True]}
            rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
            table.add_row(name, str(per), f"{tokens:,}", f"{row['dot_ms']:,.1f}", f"{row['gemms_ms']:,.1f}",
                          f"{row['dot_tflops']:.3f}", f"{row['gemms_tflops']:.3f}", f"{row['gemms_x_floor']:.2f}",
                          f"{row['gemms_over_dot']:.2f}")
        del backend
    console.print(table)
    path = save("prompt_experts", {"gemm_peaks_tflops": peak, "rows": rows},
                f"GEMM peaks (TFLOP/s): {', '.join(f'{k} {v:.3f}' for k, v in peak.items())}\n\n" + markdown(table))
    console.print(f"saved {path}")


if __name__ == "__main__":
    main()
