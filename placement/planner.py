"""Hardware + model spec (+ activation stats) -> Profile.

The always-used part (attention, router, shared experts, dense layers, lm_head) goes to the GPUs,
in contiguous layer ranges; each GPU keeps a workspace and the KV cache of its layers (up to
GPU_CONTEXT tokens a sequence: the rest of the model's full context is the host tier, in host RAM);
routed experts fill what is left; everything else runs on the CPU. The layer split is the one that holds
the most GPU experts, so more GPU memory never means fewer of them. A machine that cannot hold
the model is refused with what is missing and by how much.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from placement import cost
from placement.errors import PlacementError
from placement.hardware import Hardware
from placement.memory import GIB, MIB, host_reserve, stream_buffer_bytes, usage, workspace_bytes
from placement.model_spec import ModelSpec, int4_dot_fits
from placement.profile import (
    PROFILE_VERSION,
    CpuSection,
    Decode,
    Devices,
    KVCache,
    LayerDevices,
    ModelSection,
    Prediction,
    Prefill,
    Profile,
)

GPU_CONTEXT = 131072  # KV tokens a sequence keeps on the GPUs at most; the rest of its context in host RAM
MIN_CONTEXT = 4096  # below this a plan is refused rather than shrunk further
PAGE_SIZE = 16  # the engine's page (and prefix-cache) granularity
CHUNK_TOKENS = 4096


class PlanError(PlacementError):
    """This machine cannot run this model; the message says what is missing and by how much."""


@dataclass(frozen=True)
class Stats:
    """Recorded routing: per MoE layer, each expert's share of the layer's picks (sums to 1).
    File format: JSON {"layers": {"3": [count_expert_0, count_expert_1, ...], ...}}."""

    freqs: dict[int, list[float]]

    @classmethod
    def load(cls, path: str | Path, spec: ModelSpec) -> Stats:
        a = spec.arch
        try:
            layers = json.loads(Path(path).read_text())["layers"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PlanError(f"{path}: not a stats file ({e}); expected JSON {{\"layers\": {{\"3\": [counts]}}}}")
        freqs = {}
        for key, counts in layers.items():
            layer = int(key)
            if not a.is_moe(layer) or len(counts) != a.n_routed_experts or min(counts) < 0:
                raise PlanError(f"{path}: layer {key} must be an MoE layer ({a.first_k_dense_replace}-"
                                f"{a.num_hidden_layers - 1}) with {a.n_routed_experts} non-negative counts")
            total = sum(counts)
            freqs[layer] = [c / total for c in counts] if total else [1 / a.n_routed_experts] * len(counts)
        return cls(freqs)


@dataclass(frozen=True)
class Request:
    context: int | None = None  # tokens per sequence; None: the model's full context, or the most host RAM holds
    concurrency: int = 1
    stats: Stats | None = None
    kv_dtype: str = "bf16"


def choose_cpu(spec: ModelSpec, hw: Hardware) -> CpuSection:
    """On any CPU with AVX2: INT4 checkpoints run as stored on the runtime's INT4 dot kernel where
    their sizes fit it (else on kt-kernel's K-group kernel); float and FP8 ones on kt-kernel,
    re-quantized for AMX (int8 when all experts fit in RAM that way, else int4) or run as bf16 (the
    runtime proves each kernel at load). A machine known to run another backend (what `hybrid
    doctor` found there) keeps it. Without AVX2, the portable torch backend. Threads: every
    physical core (kt-kernel's compute threads take all but the last, which the driving thread
    shares with kt's queue and a share of each expert's rows; hybrid/experts/kt/pool.py and
    row_split.py)."""
    cpu, a = hw.cpu, spec.arch
    threads = cpu.cores
    pools = cpu.pools(threads)
    dot = a.quant == "int4" and int4_dot_fits(a.hidden_size, a.moe_intermediate_size, a.group_size)
    backend = cpu.expert_backend or ("torch" if not cpu.has("avx2") else "dot" if dot else "kt")
    if backend == "dot" and not dot:
        backend = "kt"
    if a.quant == "int4":
        return CpuSection(backend=backend, method="int4_kgroup", threads=threads, threadpools=pools)
    if cpu.has("amx") and backend == "kt":
        int8 = len(a.moe_layers) * a.n_routed_experts * spec.expert_host_bytes("amx_int8")
        method = "amx_int8" if int8 + host_reserve(hw.ram_bytes) <= hw.ram_bytes else "amx_int4"
        return CpuSection(backend=backend, method=method, threads=threads, threadpools=pools)
    return CpuSection(backend=backend, method="bf16", threads=threads, threadpools=pools)


def plan(spec: ModelSpec, hw: Hardware, req: Request = Request()) -> Profile:
    a = spec.arch
    if req.context is not None and req.context > a.max_position_embeddings:
        raise PlanError(f"context {req.context} exceeds the model's max_position_embeddings "
                        f"({a.max_position_embeddings})")
    cpu = choose_cpu(spec, hw)
    fig = cost.figures(hw, cpu.backend, cpu.method, cpu.threads)
    context = req.context or a.max_position_embeddings
    if hw.gpus:
        devices, gpu_experts, on_gpu, buffers = _gpu_layout(spec, hw, req, fig, cpu.method, context)
    else:
        devices, gpu_experts, context, buffers = _cpu_layout(spec, hw, req, cpu, context)
        on_gpu = _whole_pages(context)
    p = Profile(
        version=PROFILE_VERSION, model=ModelSection(**a.model_dump(), config_hash=a.digest()),
        hardware=hw, devices=devices, gpu_experts=gpu_experts, cpu=cpu,
        kv_cache=_kv_cache(req.kv_dtype, context, req.concurrency, on_gpu),
        prefill=Prefill(chunk_tokens=CHUNK_TOKENS), decode=Decode())
    p.prefill.stream_threshold_tokens = _threshold(p, spec, fig, req) if buffers else None
    if p.prefill.stream_threshold_tokens is not None:
        p.prefill.stream_buffer_mib = {d: b // MIB for d, b in buffers.items()}
    if req.context is None:
        _fit_host_tier(p, spec)
    _check_host(p, spec)
    if hw.gpus and all(len(p.gpu_experts_of(layer)) == a.n_routed_experts for layer in a.moe_layers):
        p.devices.embed = p.device_of("attention", 0)  # every expert is on a GPU: the embedding may go too
        u = usage(p, spec)[p.devices.embed]
        if u.total > u.budget:
            p.devices.embed = "cpu"
    freqs = req.stats.freqs if req.stats else None
    prompt = min(cost.PROMPT_TOKENS, context)
    dec, dec_ms = cost.decode(p, spec, fig, freqs)
    pre, pre_ms = cost.prefill(p, spec, fig, freqs, prompt)
    p.prediction = Prediction(decode_tok_s=round(dec, 2), prefill_tok_s=round(pre, 1),
                              decode_context=min(cost.DECODE_CONTEXT, context), prompt_tokens=prompt,
                              concurrency=req.concurrency, decode_ms=dec_ms, prefill_ms=pre_ms,
                              decode_curve=cost.decode_curve(p, spec, fig, freqs))
    return p


def _whole_pages(tokens: int) -> int:
    return -(-tokens // PAGE_SIZE) * PAGE_SIZE


def _kv_cache(dtype: str, context: int, concurrency: int, on_device: int) -> KVCache:
    """The cache for `concurrency` sequences of `context` tokens, each in whole pages (the engine
    gives a sequence whole pages, so its context rounds up), `on_device` tokens of each (whole
    pages) on the attention devices and the rest in host RAM."""
    seq = _whole_pages(context)
    return KVCache(dtype=dtype, page_size=PAGE_SIZE, max_tokens=seq * concurrency,
                   max_pages=seq // PAGE_SIZE * concurrency, context_length=context, concurrency=concurrency,
                   host_tokens=(seq - on_device) * concurrency)


def _fit_host_tier(p: Profile, spec: ModelSpec) -> None:
    """Shorten the served context, a page at a time, until the host tier fits host RAM (never
    below the GPU tier)."""
    kv, u = p.kv_cache, usage(p, spec)["cpu"]
    over = u.total - u.budget
    if over <= 0 or not kv.host_tokens:
        return
    per_seq = -(-over // (spec.kv_bytes_per_token(kv.dtype) * kv.concurrency))
    cut = min(_whole_pages(per_seq), kv.host_tokens // kv.concurrency)
    p.kv_cache = _kv_cache(kv.dtype, kv.context_length - cut, kv.concurrency, kv.device_tokens // kv.concurrency)


def _threshold(p: Profile, spec: ModelSpec, fig: cost.Figures, req: Request) -> int | None:
    a = spec.arch
    layers = [layer for layer in a.moe_layers if p.device_of("router", layer) != "cpu"]
    freqs = req.stats.freqs if req.stats else {}
    cpu_n = sum(a.n_routed_experts - len(p.gpu_experts_of(layer)) for layer in layers) / len(layers)
    share = sum(1 - sum(freqs[layer][i] for i in p.gpu_experts_of(layer)) if layer in freqs
                else 1 - len(p.gpu_experts_of(layer)) / a.n_routed_experts for layer in layers) / len(layers)
    slowest = min(range(len(fig.gpu_tflops)), key=fig.gpu_tflops.__getitem__)
    return cost.stream_threshold(spec, fig, p.cpu.method, cpu_n, share, slowest)


def _gpu_layout(spec: ModelSpec, hw: Hardware, req: Request, fig: cost.Figures, method: str, context: int):
    a = spec.arch
    n_layers, n_gpus, e = a.num_hidden_layers, len(hw.gpus), a.n_routed_experts
    fixed = [0]
    for layer in range(n_layers):
        fixed.append(fixed[-1] + sum(spec.layer_bytes(g, layer) for g in ("attention", "router", "shared", "dense")))
    moe = [0]
    for layer in range(n_layers):
        moe.append(moe[-1] + a.is_moe(layer))
    ws, kvpl = workspace_bytes(spec, CHUNK_TOKENS), spec.kv_bytes_per_token_layer(req.kv_dtype)
    eb = spec.bytes["expert"]
    slowest = min(range(n_gpus), key=fig.gpu_tflops.__getitem__)
    worst = cost.stream_threshold(spec, fig, method, e, 1.0, slowest)  # all experts on the CPU
    buf = stream_buffer_bytes(spec) if worst is not None and worst <= context else 0

    def left(g: int, i: int, j: int, tokens: int, staging: int) -> int:
        """GPU g's bytes after layers [i, j), their KV for `tokens`, a workspace and, where the range
        has MoE layers, `staging` bytes of stream buffer (negative: it does not fit)."""
        used = fixed[j] - fixed[i] + tokens * kvpl * (j - i) + ws + (staging if moe[j] > moe[i] else 0)
        return hw.gpus[g].budget_bytes - used - (spec.bytes["lm_head"] if j == n_layers else 0)

    def fits(tokens: int, staging: int = 0) -> bool:
        return _greedy_end(lambda g, i, j: left(g, i, j, tokens, staging), n_gpus, n_layers) == n_layers

    context = min(_whole_pages(context), GPU_CONTEXT)  # the GPU tier's share of each sequence, in pages
    target = context * req.concurrency
    if not fits(0):
        placed = _greedy_end(lambda g, i, j: left(g, i, j, 0, 0), n_gpus, n_layers)
        short = fixed[-1] - fixed[placed] + spec.bytes["lm_head"]
        raise PlanError(f"the GPU-resident weights (attention, router, shared experts, dense layers, lm_head) need "
                        f"{(fixed[-1] + spec.bytes['lm_head']) / GIB:.1f} GiB, plus {ws / GIB:.1f} GiB of workspace "
                        f"per GPU; the GPUs ({sum(g.budget_bytes for g in hw.gpus) / GIB:.1f} GiB) hold "
                        f"{f'layers 0-{placed - 1}' if placed else 'no layer'} and leave layers {placed}-"
                        f"{n_layers - 1} and lm_head without one: short by "
                        f"at least {short / GIB:.1f} GiB. Use more GPU memory, or plan for no GPU (CPU only).")
    # Regimes, in the order memory grows: KV short (no experts) -> stream buffers short (no experts)
    # -> experts fill the rest. Each step gives at least what the one before did.
    with_experts = fits(target)
    if not with_experts:
        lo, hi = 0, context // PAGE_SIZE
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid * PAGE_SIZE * req.concurrency) else (lo, mid - 1)
        context = lo * PAGE_SIZE  # the rest of each sequence in host RAM
    tokens = context * req.concurrency
    if buf and not (with_experts and fits(tokens, buf)):
        buf, with_experts = 0, False

    def share(g: int, i: int, j: int):
        """(experts, -imbalance) GPU g gets for layers [i, j); None when they do not fit."""
        ideal = n_layers * hw.gpus[g].budget_bytes / sum(x.budget_bytes for x in hw.gpus)
        if i == j:
            return 0, -ideal * ideal
        room = left(g, i, j, tokens, buf)
        if room < 0:
            return None
        return (min(room // eb, (moe[j] - moe[i]) * e) if with_experts else 0), -(j - i - ideal) ** 2

    ranges, experts, buffers = [], {}, {}
    for g, (i, j, slots) in enumerate(_best_split(share, n_gpus, n_layers)):
        if i == j:
            continue
        dev = f"cuda:{g}"
        ranges.append(LayerDevices(first=i, last=j - 1, attention=dev, router=dev, shared=dev, dense=dev))
        layers = [layer for layer in range(i, j) if a.is_moe(layer)]
        experts.update(_choose(spec, layers, slots, req.stats))
        if layers and buf:
            buffers[dev] = buf
    return Devices(embed="cpu", lm_head=ranges[-1].attention, layers=ranges), experts, context, buffers


def _best_split(share, n_gpus: int, n_layers: int) -> list[tuple[int, int, int]]:
    """(first, end, experts) per GPU over contiguous ranges that maximize the summed `share(g, i, j)`
    scores (experts first, then balance); `share` is None where a range does not fit."""
    best = {0: ((0, 0.0), [])}  # layers covered -> (score, parts)
    for g in range(n_gpus):
        nxt = {}
        for i, (score, parts) in best.items():
            for j in range(i, n_layers + 1):
                got = share(g, i, j)
                if got is None:
                    break
                cand = ((score[0] + got[0], score[1] + got[1]), parts + [(i, j, got[0])])
                if j not in nxt or cand[0] > nxt[j][0]:
                    nxt[j] = cand
        best = nxt
    return best[n_layers][1]


def _greedy_end(room, n_gpus: int, n_layers: int) -> int:
    """Layers placed when each GPU in turn takes as many as fit (`room(g, i, j)` >= 0 for [i, j)):
    for contiguous ranges this places all layers whenever any split does."""
    i = 0
    for g in range(n_gpus):
        j = i
        while j < n_layers and room(g, i, j + 1) >= 0:
            j += 1
        i = j
    return i


def _cpu_layout(spec: ModelSpec, hw: Hardware, req: Request, cpu: CpuSection, context: int):
    """No GPU: everything on the CPU; the KV cache takes host RAM after the weights."""
    a = spec.arch
    weights = spec.total_bytes - spec.routed_expert_bytes
    experts = len(a.moe_layers) * a.n_routed_experts * spec.expert_host_bytes(cpu.method)
    work = CHUNK_TOKENS * spec.activation_bytes_per_token
    room = hw.ram_bytes - host_reserve(hw.ram_bytes) - weights - experts - work
    per_token = spec.kv_bytes_per_token(req.kv_dtype) * req.concurrency
    if room < _whole_pages(context) * per_token and req.context is None:
        context = max(0, room // per_token) // PAGE_SIZE * PAGE_SIZE
        context = max(context, MIN_CONTEXT)  # too little RAM: the host check below says by how much
    devices = Devices(embed="cpu", lm_head="cpu", layers=[LayerDevices(
        first=0, last=a.num_hidden_layers - 1, attention="cpu", router="cpu", shared="cpu", dense="cpu")])
    return devices, {}, context, {}


def _check_host(p: Profile, spec: ModelSpec) -> None:
    u = usage(p, spec)["cpu"]
    if u.total <= u.budget:
        return
    short = u.total - u.budget
    fix = "Add RAM or GPU memory."
    if p.cpu.method == "bf16" and not p.hardware.cpu.has("amx"):
        # float experts are re-quantized only for AMX: on such a CPU they would take a quarter of this
        n = len(spec.arch.moe_layers) * spec.arch.n_routed_experts - sum(map(len, p.gpu_experts.values()))
        saved = n * (spec.expert_host_bytes("bf16") - spec.expert_host_bytes("amx_int4"))
        if saved >= short:
            fix = ("The CPU planned for has no AMX, so its experts run as bf16; on a CPU with AMX they are "
                   "re-quantized to amx_int4 and fit (plan for one with --isa amx). Otherwise add RAM or GPU memory.")
    raise PlanError(f"the CPU side needs {u.total / GIB:.1f} GiB of host RAM (routed experts "
                    f"{u.experts / GIB:.1f} GiB as {p.cpu.method} on the {p.cpu.backend} backend, other weights "
                    f"{u.weights / GIB:.1f} GiB, "
                    f"KV {u.kv / GIB:.1f} GiB, {u.workspace / GIB:.1f} GiB kept for the system); this machine has "
                    f"{u.budget / GIB:.1f} GiB: short by {short / GIB:.1f} GiB. {fix}")


def _choose(spec: ModelSpec, layers: list[int], slots: int, stats: Stats | None) -> dict[int, list[int]]:
    """Which experts fill `slots` GPU places over `layers`: the most used (layer, expert) pairs when
    stats are given, else the same number per layer (all experts being equally likely)."""
    if not layers:
        return {}
    e = spec.arch.n_routed_experts
    if stats is None:
        base, extra = divmod(slots, len(layers))
        return {layer: list(range(base + (k < extra))) for k, layer in enumerate(layers)}
    uniform = [1 / e] * e
    pairs = sorted((-stats.freqs.get(layer, uniform)[i], layer, i) for layer in layers for i in range(e))[:slots]
    chosen = {layer: [] for layer in layers}
    for _, layer, i in pairs:
        chosen[layer].append(i)
    return {layer: sorted(ids) for layer, ids in chosen.items()}
