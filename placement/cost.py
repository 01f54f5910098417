"""Roofline cost model: predicted decode and prefill tokens/s of a placement, with the breakdown.

Every module costs max(bytes / bandwidth, FLOPs / peak) on its device. A layer runs attention and
the router, then the CPU's routed experts (plus two PCIe hand-offs) alongside the GPU's shared and
hot experts, and waits for the slower side; deferred experts move part of the CPU side under the
next layer. Long prompts may instead stream each layer's CPU experts to the GPU while the GPU
computes the previous layer. docs/placement.md gives every formula and default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from placement.hardware import Hardware, gpu_figures
from placement.model_spec import DOT_GEMM_MIN_TOKENS, ModelSpec

# Defaults; a `measured` figure in the hardware description replaces each.
HOST_GBPS_PER_THREAD = 10.8  # one thread's host read bandwidth, measured on a 16-core Xeon with an H200
HOST_GBPS_PER_NUMA_NODE = 200.0  # assumed: an 8-channel DDR5 socket at about 65% of peak
KT_DECODE_GBPS_PER_THREAD = 6.0  # INT4 weights one kt-kernel worker streams at T = 1 (measured 5-7)
CPU_DECODE_EFFICIENCY = 0.74  # full Kimi layer at T = 1, 15 threads: 63 GB/s of weights, 85 GB/s read
TORCH_EFFICIENCY = 0.5  # routed experts on torch's int4 kernel: half the read bandwidth
# The INT4 dot kernel (hybrid/native/int4_moe.cpp): at T = 1 a core streams ~20 GB/s of INT4 on
# its own (one core cannot draw more of the memory), so few cores are bound by themselves, many by
# the memory, whose bandwidth it reaches (a Kimi layer at T = 1: 109 of 110 GB/s on a 16-core AMX
# Xeon, 0.94-1.06 of it on 2 Zen 4 cores). Prefill: its integer dot products on many tokens, per
# thread by the CPU class: measured on Zen 4 (AVX-512 VNNI, 2 threads: 0.37-0.42 TFLOP/s on a layer of
# `mini`'s experts at 16-256 pairs an expert, 0.55-0.65 on Kimi's longer rows; `bench.prompt_experts`)
# and on the 16-core AMX Xeon (a Kimi layer at T = 512: 0.78
# TFLOP/s, where one thread alone reached 0.14); AVX2 assumed at 0.08, about half of Zen 4 (`vpmaddubsw` does
# half of `vpdpbusd`'s work per instruction). Rows are cut into super-blocks of LANES blocks of 32
# (`dot_lane_share`). Where the CPU multiplies bf16 in hardware, an expert with DOT_GEMM_MIN_TOKENS
# or more in a call runs as bf16 GEMMs instead: measured on Zen 4 at 0.30 TFLOP/s a thread (`mini`'s
# 2,048-token prefill, 1.03 TFLOP of experts in 1.70 s on 2 threads: 0.61 of oneDNN's bf16 peak);
# on AMX assumed at the same share of oneDNN's AMX peak (4.6 TFLOP/s on the 16-core Xeon). Each
# expert run so costs besides its FLOPs a fixed 0.2 ms for its small ops (measured on Zen 4: the
# default model's 512-token prefill, 48 expert runs, 10-11 ms where their FLOPs take 1.2; one of its
# experts on 128 tokens alone 0.16 ms, its share of the grouping around it 0.075) and the
# dequantizing of its weights, 11 G values a second a thread (measured into a reused tile on 2 Zen 4
# threads: one of `mini`'s experts, 6.3 M values, in 0.27-0.29 ms; one of Kimi's, 44 M, in 1.54-1.59).
DOT_DECODE_GBPS_PER_THREAD = 17.0
DOT_HOST_SHARE = 0.95
DOT_PREFILL_TFLOPS_PER_THREAD = {"amx": 0.049, "avx512_bf16": 0.2, "avx2": 0.08}
DOT_GEMM_TFLOPS_PER_THREAD = {"amx": 0.61 * 4.6 / 16, "avx512_bf16": 0.30}
DOT_GEMM_EXPERT_S = 0.2e-3
DOT_DEQUANT_GVALUES_PER_THREAD = 11.0
DOT_LANES = {"amx": 16, "avx512_bf16": 16, "avx2": 8}
# Dense modules placed on the CPU run on the kernel the runtime measures fastest at load
# (hybrid/model/dense_kernel.py): on Zen 4 the compiled GEMV; on AVX2 the planner assumes torch's
# matmul (not measured there against the compiled GEMV, which the runtime times at load as well).
# Per kernel: the share of the host read bandwidth (a torch sum, all threads) it reaches for one
# token (measured on Zen 4: the compiled GEMV 33-40 of 38-54 GB/s in a decode step's lm_head,
# oneDNN 24 of 38-52, torch 14), and bf16 GEMM FLOP/s per core (measured: Zen 4 0.47, `mini`'s
# prefill of 2,048 tokens, its dense MLP 142 GFLOP in 147 ms on 2 threads; AVX2 0.01, no bf16
# units).
DENSE_EFFICIENCY = {"compiled": 0.75, "onednn": 0.55, "torch": 0.3}
DENSE_TFLOPS_PER_THREAD = {"amx": 4.7 / 15, "avx512_bf16": 0.47, "avx2": 0.01}
# Decode attention over the host tier (hybrid/model/attention.py: one token's heads against a
# context read in blocks) has only one row per head in its matmuls, where the CPU's GEMM reaches a
# share of its peak, and a softmax per block: measured 0.105 TFLOP/s at 8K, 32K and 64K tokens (16
# heads, Zen 4, 2 threads), which was 0.27 of that machine's bf16 GEMM rate then; AMX and AVX2
# assumed at the same share of their bf16 GEMM rates. FP8 latents are decoded to bf16 there as
# well (integer ops, hybrid/model/kv_cache.py), which the bf16 cache does not pay: measured as the
# time FP8 adds over bf16 in the same run, 2.4-3.0 G values/s a thread.
CPU_ATTENTION_TFLOPS_PER_THREAD = {"amx": 0.27 * 4.7 / 15, "avx512_bf16": 0.105 / 2, "avx2": 0.27 * 0.01}
FP8_DECODE_GVALUES_PER_THREAD = 2.5
# Prefill attention on the CPU (hybrid/model/attention.py `block_probs`) takes its query x key
# products with fp32 sums (bf16 scores would move each probability by ~0.4%). On CPUs with
# AVX512-BF16 (AMX Xeons have it too) our kernel (hybrid/native/attention_probs.cpp) computes
# them, the mask and the softmax while the scores are in L2 and writes bf16 probabilities, which
# the second product reads: 4 bytes a score through memory, at 0.25 TFLOP/s a thread (measured on
# Zen 4 over a 2,048-token layer of `mini`, softmax included; assumed the same per AVX-512 core on
# AMX). Elsewhere torch's fp32 GEMM (AVX2: 0.04 a core, from 0.08 on 2 Zen 3 cores) and 40 bytes
# a score: written, scaled, masked, softmaxed, copied to bf16 and read again (4 + 8 + 8 + 12 + 6 + 2).
SCORES_TFLOPS_PER_THREAD = {"amx": 0.25, "avx512_bf16": 0.25, "avx2": 0.04}
CPU_SCORE_BYTES = {"amx": 4, "avx512_bf16": 4, "avx2": 40}
# per module on the CPU: its small ops, thread wake-ups, each weight's cold start, and its share of
# the pass's norms and residual adds. Measured on Zen 4: in decode steps the default model's, all of
# it such time, 0.93-1.1 ms over 12 modules (its attention in one native call 0.045 ms a layer),
# `mini`'s attention 0.1-0.2 ms a layer over its bytes, its router 0.08; a prompt's chunk runs many
# more ops a module (the default model's 512-token prefill: 6.1 ms over 12 modules beyond their
# FLOPs and its experts).
CPU_MODULE_OVERHEAD_S = 0.08e-3
CPU_PREFILL_MODULE_OVERHEAD_S = 0.5e-3
PREFILL_TFLOPS_PER_THREAD = {  # expert FLOP/s per kt thread on long prompts
    "int4_kgroup": 1.0 / 15,  # RAWINT4, measured 1.0 TFLOP/s on 15 threads
    "amx_int4": 9.4 / 15,  # measured 9.4 TFLOP/s on 15 threads
    "amx_int8": 9.4 / 15,  # assumed equal to amx_int4: both run int8 AMX tiles
    "bf16": 4.7 / 15,  # assumed: AMX bf16 tiles at half the int8 rate
}
NO_AMX_TFLOPS_PER_THREAD = 0.05  # assumed: AVX-512 bf16 / torch matmuls per core
GPU_BW_EFFICIENCY = 0.8
GPU_FLOPS_EFFICIENCY = 0.5
LINK_LATENCY_S = 10e-6  # one host <-> device hand-off of activations
DECODE_CONTEXT = 4096  # context each sequence has when decode speed is quoted
CURVE_CONTEXTS = (8192, 32768, 131072, 262144)  # contexts the decode curve is predicted at (up to the served one)
PROMPT_TOKENS = 8192  # prompt length prefill speed is quoted for


@dataclass(frozen=True)
class Figures:
    """The hardware rates the model uses, resolved from the inventory, the tables and `measured`."""

    gpu_gbps: tuple[float, ...]
    gpu_tflops: tuple[float, ...]
    pcie_gbps: float
    host_gbps: float
    cpu_decode_gbps: float  # routed-expert weights per second at T = 1
    cpu_prefill_tflops: float  # routed-expert FLOP/s on long prompts
    torch_tflops: float  # dense modules placed on the CPU
    attention_tflops: float  # decode attention over latents in host RAM
    cpu_gemm_tflops: float = 0.0  # routed-expert FLOP/s as bf16 GEMMs (`DOT_GEMM_MIN_TOKENS` and more)
    dequant_gvalues: float = 0.0  # INT4 values dequantized per second for those GEMMs
    dense_gbps: float = 0.0  # what dense modules on the CPU read per second for one token
    fp8_decode_gvalues: float = 0.0  # FP8 latents the CPU decodes per second (G values), attending to them
    scores_tflops: float = 0.0  # prefill attention's scores on the CPU (`SCORES_TFLOPS_PER_THREAD`)
    score_bytes: int = 0  # and what each moves through memory
    dot_lanes: int = 0  # blocks of 32 per super-block of the INT4 dot kernel, where it runs the experts


def figures(hw: Hardware, backend: str, method: str, threads: int) -> Figures:
    m, cpu = hw.measured, hw.cpu
    table = [gpu_figures(g.name) for g in hw.gpus]
    host = m.host_gbps or min(cpu.cores * HOST_GBPS_PER_THREAD, cpu.numa_nodes * HOST_GBPS_PER_NUMA_NODE)
    isa = next((i for i in ("amx", "avx512_bf16") if cpu.has(i)), "avx2")
    gemm = 0.0
    if backend == "dot":
        decode = min(host * DOT_HOST_SHARE, threads * DOT_DECODE_GBPS_PER_THREAD)
        rate, gemm = DOT_PREFILL_TFLOPS_PER_THREAD[isa], DOT_GEMM_TFLOPS_PER_THREAD.get(isa, 0.0) * threads
    elif backend == "kt":
        per_thread = m.cpu_decode_gbps_per_thread or KT_DECODE_GBPS_PER_THREAD
        decode = min(host, threads * per_thread) * CPU_DECODE_EFFICIENCY
        rate = PREFILL_TFLOPS_PER_THREAD[method] if cpu.has("amx") or method == "int4_kgroup" \
            else NO_AMX_TFLOPS_PER_THREAD
    else:
        decode, rate = host * TORCH_EFFICIENCY, NO_AMX_TFLOPS_PER_THREAD
    dense_kernel = "torch" if isa == "avx2" else "compiled"
    return Figures(
        gpu_gbps=tuple(m.gpu_gbps or t[1] * GPU_BW_EFFICIENCY for t in table),
        gpu_tflops=tuple(m.gpu_tflops or t[2] * GPU_FLOPS_EFFICIENCY for t in table),
        pcie_gbps=m.pcie_gbps or min((t[3] for t in table), default=25.0),
        host_gbps=host, cpu_decode_gbps=decode,
        cpu_prefill_tflops=m.cpu_prefill_tflops or rate * threads, cpu_gemm_tflops=(m.cpu_prefill_tflops or gemm) if gemm else 0.0,
        dequant_gvalues=DOT_DEQUANT_GVALUES_PER_THREAD * threads if gemm else 0.0,
        torch_tflops=DENSE_TFLOPS_PER_THREAD[isa] * cpu.cores,
        attention_tflops=CPU_ATTENTION_TFLOPS_PER_THREAD[isa] * cpu.cores, dense_gbps=host * DENSE_EFFICIENCY[dense_kernel],
        fp8_decode_gvalues=FP8_DECODE_GVALUES_PER_THREAD * cpu.cores,
        scores_tflops=SCORES_TFLOPS_PER_THREAD[isa] * cpu.cores, score_bytes=CPU_SCORE_BYTES[isa],
        dot_lanes=DOT_LANES[isa] if backend == "dot" else 0,
    )


@dataclass
class Breakdown:
    """Seconds per term; `total` is the critical path, so sum(terms) - total is what overlapped."""

    fig: Figures
    terms: dict[str, float] = field(default_factory=dict)
    module_overhead_s: float = CPU_MODULE_OVERHEAD_S  # per CPU module call (a prompt's chunks: more)

    def add(self, term: str, seconds: float) -> float:
        self.terms[term] = self.terms.get(term, 0.0) + seconds
        return seconds

    def module(self, device: str, nbytes: float, flops: float) -> float:
        if device == "cpu":
            read = self.add("CPU modules: bytes / host bandwidth", nbytes / (self.fig.dense_gbps * 1e9))
            compute = self.add("CPU modules: FLOPs / CPU peak", flops / (self.fig.torch_tflops * 1e12))
            return max(read, compute) + self.add("CPU modules: per-module overhead", self.module_overhead_s)
        i = int(device.split(":")[1])
        read = self.add("GPU memory reads", nbytes / (self.fig.gpu_gbps[i] * 1e9))
        return max(read, self.add("GPU compute", flops / (self.fig.gpu_tflops[i] * 1e12)))

    def link(self, nbytes: float) -> float:
        return self.add("PCIe transfers", nbytes / (self.fig.pcie_gbps * 1e9) + LINK_LATENCY_S)

    def report(self, total: float) -> dict[str, float]:
        ms = {k: round(v * 1e3, 3) for k, v in self.terms.items() if v > 0}
        ms["overlapped"] = -round((sum(self.terms.values()) - total) * 1e3, 3)
        ms["total"] = round(total * 1e3, 3)
        return ms


def touched(share: float, tokens: int) -> float:
    """The chance that an expert each token picks with probability `share` is picked by one of
    `tokens` tokens: the share of a layer's experts a batch reads, under uniform routing."""
    return 1 - (1 - min(1.0, share)) ** tokens


def _experts(spec: ModelSpec, gpu_ids: list[int], freq: list[float] | None, tokens: int):
    """(distinct GPU experts touched, distinct CPU experts touched, share of picks on the GPU)."""
    a = spec.arch
    e, k = a.n_routed_experts, a.num_experts_per_tok
    if freq is None:
        hit = touched(k / e, tokens)
        g = len(gpu_ids)
        return g * hit, (e - g) * hit, g / e
    on_gpu = set(gpu_ids)
    gpu = cpu = share = 0.0
    for i, f in enumerate(freq):
        t = touched(k * f, tokens)
        if i in on_gpu:
            gpu, share = gpu + t, share + f
        else:
            cpu += t
    return gpu, cpu, share


def dot_lane_share(spec: ModelSpec, lanes: int) -> float:
    """The share of the INT4 dot kernel's lanes an expert's rows fill: a row is cut into super-blocks
    of `lanes` blocks of 32 values, and a row shorter than a whole number of them leaves lanes idle
    (gate and up rows hold hidden_size values, down rows moe_intermediate_size; weighted 2:1 by
    their FLOPs). 1 at Kimi's sizes; 0.375 at the default model's 256 and 128 on AVX-512."""
    def share(k: int) -> float:
        return k / (math.ceil(k / (32 * lanes)) * 32 * lanes)
    a = spec.arch
    return 3 / (2 / share(a.hidden_size) + 1 / share(a.moe_intermediate_size))


def gemm_share(per_expert: float) -> float:
    """The share of a call's (token, expert) pairs whose expert has DOT_GEMM_MIN_TOKENS or more of
    them, each expert's count Poisson with mean `per_expert`: E[N; N >= M] = mean * P(N >= M - 1)."""
    term, below = math.exp(-per_expert), 0.0  # P(N <= M - 2), summed term by term
    for i in range(DOT_GEMM_MIN_TOKENS - 1):
        below += term
        term *= per_expert / (i + 1)
    return max(0.0, 1.0 - below)


def cpu_expert_seconds(fig: Figures, spec: ModelSpec, picks: float, distinct: float) -> tuple[float, float]:
    """Compute seconds of `picks` (token, expert) pairs over `distinct` routed experts on the CPU,
    and the fixed cost of the experts among them run as bf16 GEMMs: those with DOT_GEMM_MIN_TOKENS
    or more pairs (`gemm_share`), where the backend has GEMMs, each paying its small ops and the
    dequantizing of its weights; the rest at the backend's own rate times its lane share."""
    share = gemm_share(picks / max(distinct, 1e-9)) if fig.cpu_gemm_tflops else 0.0
    own = fig.cpu_prefill_tflops * (dot_lane_share(spec, fig.dot_lanes) if fig.dot_lanes else 1.0)
    flops = picks * spec.expert_flops / 1e12
    if not share:
        return flops / own, 0.0
    values = 3 * spec.arch.hidden_size * spec.arch.moe_intermediate_size
    fixed = distinct * share * (DOT_GEMM_EXPERT_S + values / (fig.dequant_gvalues * 1e9))
    return flops * share / fig.cpu_gemm_tflops + flops * (1 - share) / own, fixed


def _cpu_experts(b: Breakdown, spec: ModelSpec, method: str, distinct: float, picks: float, gbps: float) -> float:
    read = b.add("CPU expert bytes / host bandwidth", distinct * spec.expert_host_bytes(method) / (gbps * 1e9))
    compute, fixed = cpu_expert_seconds(b.fig, spec, picks, distinct)
    compute = b.add("CPU expert FLOPs / CPU peak", compute)
    if fixed:
        compute += b.add("CPU experts as GEMMs: per-expert cost", fixed)
    return max(read, compute)


def _cpu_prefill_scores(b: Breakdown, spec: ModelSpec, start: int, tokens: int) -> float:
    """What one layer's prefill attention on the CPU adds over its GEMM-rate FLOPs, for `tokens`
    queries after `start` earlier tokens: the query x key products with fp32 sums and the traffic of
    the scores (SCORES_TFLOPS_PER_THREAD, CPU_SCORE_BYTES). Each block of queries reads the keys up
    to its last, taken here as every query reading start + tokens keys (exact for one block)."""
    a = spec.arch
    scores = a.num_attention_heads * tokens * (start + tokens)
    qk = 2 * scores * (a.qk_nope_head_dim + a.qk_rope_head_dim)
    products = b.add("CPU prefill scores: FLOPs / scores rate", qk / (b.fig.scores_tflops * 1e12))
    return products + b.add("CPU prefill scores: bytes / host bandwidth",
                            scores * b.fig.score_bytes / (b.fig.host_gbps * 1e9))


def tiers(p, context: int) -> tuple[int, int]:
    """(tokens on the attention device, tokens in host RAM) of one sequence at `context`: its newest
    tokens fill its share of the device tier, older ones are in the host tier."""
    kv = p.kv_cache
    on_device = min(context, kv.device_tokens // kv.concurrency)
    return on_device, context - on_device


def _cpu_attention(b: Breakdown, spec: ModelSpec, p, n: int, tokens: int) -> float:
    """One layer's decode attention over `tokens` latents of each of n sequences in host RAM: reading
    them and attending to them in the absorbed form at the rate the CPU reaches there (FP8 latents
    decoded on the way). The whole context where attention runs on the CPU; the host tier's part
    where it runs on a GPU."""
    a, fp8 = spec.arch, p.kv_cache.dtype == "fp8"
    read = b.add("host KV bytes / host bandwidth",
                 n * tokens * spec.kv_bytes_per_token_layer(p.kv_cache.dtype) / (b.fig.host_gbps * 1e9))
    flops = n * (spec.attention_flops(tokens, absorbed=True) - spec.attention_flops(0, absorbed=True))
    compute = b.add("CPU attention FLOPs / CPU attention rate",
                    flops / (b.fig.attention_tflops * 1e12))
    if fp8:
        values = n * tokens * (a.kv_lora_rank + a.qk_rope_head_dim)
        compute += b.add("host FP8 latents decoded on the CPU", values / (b.fig.fp8_decode_gvalues * 1e9))
    return max(read, compute)


def decode(p, spec: ModelSpec, fig: Figures, freqs: dict[int, list[float]] | None = None,
           context: int | None = None) -> tuple[float, dict]:
    """Tokens/s of one decode step of `concurrency` sequences at `context` (default DECODE_CONTEXT),
    and the breakdown. Where a sequence's context outgrows its device tier, the layer's attention is
    split: the device over its tokens, the CPU over the host tier's, at the same time."""
    a, b = spec.arch, Breakdown(fig)
    n, ctx = p.kv_cache.concurrency, min(context or DECODE_CONTEXT, p.kv_cache.context_length)
    act, k, defer = n * a.hidden_size * 2, a.num_experts_per_tok, p.decode.defer_experts / a.num_experts_per_tok
    total, where = 0.0, p.devices.embed
    for layer in range(a.num_hidden_layers):
        dev = p.device_of("attention", layer)
        total += b.link(act) if dev != where else 0.0
        if dev == "cpu":  # its projections, then the whole context as the CPU attends to it
            pre = b.module(dev, spec.bytes["attention"], n * spec.attention_flops(0, absorbed=True))
            pre += _cpu_attention(b, spec, p, n, ctx)
        else:
            near, far = tiers(p, ctx)
            kv = n * near * spec.kv_bytes_per_token_layer(p.kv_cache.dtype)
            pre = b.module(dev, spec.bytes["attention"] + kv, n * spec.attention_flops(near, absorbed=True))
            if far:  # the host tier's part beside the device's, with the hand-offs of the queries and
                # of the partial results (fp32 latents and log-sum-exp)
                handoffs = 2 * b.link(n * a.num_attention_heads * (a.kv_lora_rank + 1) * 4)
                pre = max(pre, _cpu_attention(b, spec, p, n, far) + handoffs)
        if not a.is_moe(layer):
            total += pre + b.module(p.device_of("dense", layer), spec.bytes["dense"], n * 2 * spec.params["dense"])
            where = p.device_of("dense", layer)
            continue
        where = p.device_of("router", layer)
        pre += b.module(where, spec.bytes["router"], n * 2 * spec.params["router"])
        ids = p.gpu_experts_of(layer)
        g_n, c_n, share = _experts(spec, ids, (freqs or {}).get(layer), n)
        gpu = b.module(where, g_n * spec.bytes["expert"], n * k * share * spec.expert_flops) if ids else 0.0
        cpu = _cpu_experts(b, spec, p.cpu.method, c_n, n * k * (1 - share), fig.cpu_decode_gbps) if c_n else 0.0
        if cpu and where != "cpu":
            cpu += b.link(act) + b.link(act)
        shared = b.module(p.device_of("shared", layer), spec.bytes["shared"], n * 2 * spec.params["shared"])
        if p.device_of("shared", layer) == "cpu":
            cpu += shared
        else:
            gpu += shared
        total += max(pre + max((1 - defer) * cpu, gpu), cpu)
    total += b.link(act) if p.devices.lm_head != where else 0.0
    total += b.module(p.devices.lm_head, spec.bytes["lm_head"], n * 2 * spec.params["lm_head"])
    return n / total, b.report(total)


def decode_curve(p, spec: ModelSpec, fig: Figures, freqs: dict[int, list[float]] | None = None) -> dict[int, float]:
    """Predicted decode tokens/s at each of CURVE_CONTEXTS the profile serves, and at its full context."""
    full = p.kv_cache.context_length
    points = sorted({c for c in CURVE_CONTEXTS if c < full} | {full})
    return {c: round(decode(p, spec, fig, freqs, c)[0], 2) for c in points}


def prefill(p, spec: ModelSpec, fig: Figures, freqs: dict[int, list[float]] | None = None,
            prompt: int = PROMPT_TOKENS) -> tuple[float, dict]:
    """Tokens/s of one prompt of `prompt` tokens, processed in chunks, and the breakdown."""
    a, b = spec.arch, Breakdown(fig, module_overhead_s=CPU_PREFILL_MODULE_OVERHEAD_S)
    k, step = a.num_experts_per_tok, p.prefill.chunk_tokens
    chunks = [(s, min(step, prompt - s)) for s in range(0, prompt, step)]
    stream = p.prefill.stream_threshold_tokens is not None and prompt >= p.prefill.stream_threshold_tokens
    total = 0.0
    for layer in range(a.num_hidden_layers):
        dev, router = p.device_of("attention", layer), p.device_of("router", layer)
        moe = a.is_moe(layer)
        ids = p.gpu_experts_of(layer) if moe else []
        layer_s = 0.0
        for start, t in chunks:
            att = b.module(dev, spec.bytes["attention"], t * spec.attention_flops(start + t // 2, absorbed=False))
            if dev == "cpu":
                att += _cpu_prefill_scores(b, spec, start, t)
            if not moe:
                dense = p.device_of("dense", layer)
                layer_s += att + b.module(dense, spec.bytes["dense"], t * 2 * spec.params["dense"])
                continue
            att += b.module(router, spec.bytes["router"], t * 2 * spec.params["router"])
            shared_dev = p.device_of("shared", layer)
            shared = b.module(shared_dev, spec.bytes["shared"], t * 2 * spec.params["shared"])
            g_n, c_n, share = _experts(spec, ids, (freqs or {}).get(layer), t)
            if stream and router != "cpu":  # every routed expert runs on the GPU
                layer_s += att + shared + b.module(router, (g_n + c_n) * spec.bytes["expert"],
                                                   t * k * spec.expert_flops)
                continue
            gpu = b.module(router, g_n * spec.bytes["expert"], t * k * share * spec.expert_flops) if ids else 0.0
            cpu = _cpu_experts(b, spec, p.cpu.method, c_n, t * k * (1 - share), fig.host_gbps) if c_n else 0.0
            if cpu and router != "cpu":
                cpu += b.link(t * a.hidden_size * 2) + b.link(t * a.hidden_size * 2)
            if shared_dev == "cpu":
                cpu += shared
            else:
                gpu += shared
            layer_s += att + max(cpu, gpu)
        if stream and moe and router != "cpu":  # the next layer's experts arrive while this one computes
            resident = (a.n_routed_experts - len(ids)) * spec.bytes["expert"]
            layer_s = max(layer_s, b.add("expert streaming (PCIe)", resident / (fig.pcie_gbps * 1e9)))
        total += layer_s
    total += b.module(p.devices.lm_head, spec.bytes["lm_head"], 2 * spec.params["lm_head"])
    return prompt / total, b.report(total)


def stream_threshold(spec: ModelSpec, fig: Figures, method: str, cpu_experts: float, cpu_share: float,
                     gpu: int = 0) -> int | None:
    """Smallest prompt for which streaming a layer's `cpu_experts` over PCIe (and running them on
    GPU `gpu`) beats running them on the CPU; None when it never does."""
    if not cpu_experts or not fig.gpu_tflops:
        return None
    a = spec.arch
    e, k, flops = a.n_routed_experts, a.num_experts_per_tok, spec.expert_flops
    stream_s = cpu_experts * spec.bytes["expert"] / (fig.pcie_gbps * 1e9)

    def wins(t: int) -> bool:
        picks, distinct = t * k * cpu_share, cpu_experts * touched(k / e, t)
        cpu_s = max(distinct * spec.expert_host_bytes(method) / (fig.host_gbps * 1e9),
                    sum(cpu_expert_seconds(fig, spec, picks, distinct)))
        return max(stream_s, picks * flops / (fig.gpu_tflops[gpu] * 1e12)) < cpu_s

    lo, hi = 1, 1 << 22
    if not wins(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if wins(mid) else (mid + 1, hi)
    return lo
