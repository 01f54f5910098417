"""Where a decode step's and a prefill's time goes, part by part, beside each part's floor.

The parts are timed by hooks on the modules that compute them (attention, dense MLPs, shared
experts, routers, lm_head), routed experts as the rest of each MoE layer's time, sampling around
the forward pass, and framework overhead as what is left of the wall time. Floors: for decode,
the bytes a part must read per token (its weights as held, the chosen experts, the latent cache)
over the host read bandwidth; for prefill, its FLOPs over the highest GEMM throughput measured
among the kernels the runtime can use. `hybrid bench` and `python -m bench.cpu` print them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from hybrid.api import HybridModel
from hybrid.model.attention import MLA
from hybrid.model.batch import ForwardBatch
from hybrid.model.moe import MLP, MoE, Router
from placement.cost import touched

PARTS = ("attention", "dense MLP", "shared experts", "router", "routed experts", "lm_head", "sampling", "overhead")


@dataclass
class Breakdown:
    """Measured seconds and floor seconds per part of one pass."""

    phase: str
    tokens: int
    seconds: dict[str, float] = field(default_factory=dict)
    floor: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    @property
    def floor_total(self) -> float:
        return sum(self.floor.values())

    def to_json(self) -> dict:
        ms = lambda d: {k: round(v * 1e3, 3) for k, v in d.items()}  # noqa: E731
        return {"phase": self.phase, "tokens": self.tokens, "ms": ms(self.seconds), "floor_ms": ms(self.floor),
                "total_ms": round(self.total * 1e3, 3), "floor_total_ms": round(self.floor_total * 1e3, 3)}


def weights(module: nn.Module) -> list[torch.Tensor]:
    """A module's weights as held: its parameters and oneDNN's packed weights (plain attributes)."""
    packed = [m.weight for m in module.modules()
              if isinstance(getattr(m, "weight", None), torch.Tensor) and not isinstance(m.weight, nn.Parameter)]
    return list(module.parameters()) + packed


def _part(name: str, module: nn.Module) -> str | None:
    if isinstance(module, MLA):
        return "attention"
    if isinstance(module, Router):
        return "router"
    if isinstance(module, MoE):
        return "moe"
    if isinstance(module, MLP):
        return "shared experts" if name.endswith("shared_experts") else "dense MLP"
    if name == "lm_head":
        return "lm_head"
    return None


@contextmanager
def timed_parts(model: nn.Module):
    """Within the block, the returned dict sums the seconds spent in each part's modules."""
    spent: dict[str, float] = defaultdict(float)
    handles = []
    for name, module in model.named_modules():
        part = _part(name, module)
        if part is None:
            continue

        def pre(mod, args, part=part):
            mod._breakdown_start = time.perf_counter()

        def post(mod, args, out, part=part):
            spent[part] += time.perf_counter() - mod._breakdown_start

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield spent
    finally:
        for h in handles:
            h.remove()


def _measured(spent: dict[str, float], wall: float, sampling: float) -> dict[str, float]:
    """Per part, with routed experts as each MoE layer's time less its router and shared expert."""
    out = {p: spent.get(p, 0.0) for p in PARTS}
    out["routed experts"] = max(0.0, spent.get("moe", 0.0) - out["router"] - out["shared experts"])
    out["sampling"] = sampling
    out["overhead"] = max(0.0, wall - sum(v for k, v in out.items() if k != "overhead"))
    return out


def _sizes(hm: HybridModel) -> tuple[dict[str, int], dict[str, int]]:
    """(bytes, parameters) per part; routed experts: one expert's share of each layer's backend."""
    decoder, cfg = hm.decoder, hm.config
    b, n = defaultdict(int), defaultdict(int)
    for name, module in decoder.named_modules():
        part = _part(name, module)
        if part in (None, "moe"):
            continue
        held = weights(module)
        b[part] += sum(w.numel() * w.element_size() for w in held)
        n[part] += sum(w.numel() for w in held)
    experts = [layer.mlp.experts for layer in decoder.model.layers if isinstance(layer.mlp, MoE)]
    held = sum(getattr(e, "cpu", e).nbytes() for e in experts)  # the CPU backend under the scheduler
    b["expert"] = held // max(1, cfg.n_routed_experts)  # one expert of every MoE layer
    n["expert"] = len(experts) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    return b, n


def decode_floor(hm: HybridModel, context: int, host_gbps: float, batch: int = 1) -> dict[str, float]:
    """Seconds each part must take to read what one decode step of `batch` sequences needs."""
    cfg, (b, _) = hm.config, _sizes(hm)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    distinct = e * touched(k / e, batch)  # experts the batch reads per layer, in expectation
    kv = batch * context * cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    need = {"attention": b["attention"] + kv, "dense MLP": b["dense MLP"], "shared experts": b["shared experts"],
            "router": b["router"], "routed experts": distinct * b["expert"], "lm_head": b["lm_head"],
            "sampling": batch * cfg.vocab_size * 4}
    return {p: need.get(p, 0) / (host_gbps * 1e9) for p in PARTS}


def prefill_floor(hm: HybridModel, tokens: int, peak_tflops: float) -> dict[str, float]:
    """Seconds each part must take to compute a prompt of `tokens` at the measured GEMM peak."""
    cfg, (_, n) = hm.config, _sizes(hm)
    heads, qk, v = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    scores = cfg.num_hidden_layers * heads * (qk + v) * tokens * (tokens + 1)  # 2 FLOPs x causal half
    flops = {"attention": 2 * tokens * n["attention"] + scores, "dense MLP": 2 * tokens * n["dense MLP"],
             "shared experts": 2 * tokens * n["shared experts"], "router": 2 * tokens * n["router"],
             "routed experts": 2 * tokens * cfg.num_experts_per_tok * n["expert"], "lm_head": 2 * n["lm_head"]}
    return {p: flops.get(p, 0) / (peak_tflops * 1e12) for p in PARTS}


def decode_step(hm: HybridModel, context: int = 128, steps: int = 8, seed: int = 0) -> Breakdown:
    """The fastest of `steps` greedy decode steps after a prompt of `context` tokens, by part."""
    cfg = hm.config
    ids = torch.randint(0, cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(seed))
    cache = hm.new_cache(context + steps + 2)
    token = int(hm.decoder(ForwardBatch.single(ids, 0, torch.arange(context)), cache)[0].argmax())
    best = None
    for step in range(steps + 1):
        pos = context + step
        batch = ForwardBatch.single(torch.tensor([token]), pos, torch.arange(pos + 1))
        with timed_parts(hm.decoder) as spent:
            start = time.perf_counter()
            logits = hm.decoder(batch, cache)
            mid = time.perf_counter()
            token = int(logits[0].argmax())
            end = time.perf_counter()
        if step and (best is None or end - start < best[0]):  # the first step warms up
            best = (end - start, dict(spent), end - mid)
    wall, spent, sampling = best
    return Breakdown("decode", 1, _measured(spent, wall, sampling))


def prefill(hm: HybridModel, tokens: int = 2048, seed: int = 0) -> Breakdown:
    """One prompt of `tokens` through the model in one pass, by part, after another of its length
    (what the first prompt of a length builds once, later ones find: `hybrid.measure.measure`)."""
    cfg = hm.config
    ids = torch.randint(0, cfg.vocab_size, (2, tokens), generator=torch.Generator().manual_seed(seed))
    hm.decoder(ForwardBatch.single(ids[1]))
    ids = ids[0]
    cache = hm.new_cache(tokens)
    with timed_parts(hm.decoder) as spent:
        start = time.perf_counter()
        logits = hm.decoder(ForwardBatch.single(ids, 0, torch.arange(tokens)), cache)
        mid = time.perf_counter()
        int(logits[0].argmax())
        end = time.perf_counter()
    return Breakdown("prefill", tokens, _measured(dict(spent), end - start, end - mid))


def table(b: Breakdown, title: str):
    """A rich table: each part's measured ms beside its floor."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("part", "ms", "floor ms", "x floor"):
        t.add_column(col, justify="left" if col == "part" else "right")
    for part in PARTS:
        ms, floor = b.seconds[part] * 1e3, b.floor.get(part, 0.0) * 1e3
        t.add_row(part, f"{ms:,.2f}", f"{floor:,.2f}", f"{ms / floor:.2f}" if floor > 1e-3 else "")
    t.add_row("total", f"{b.total * 1e3:,.2f}", f"{b.floor_total * 1e3:,.2f}",
              f"{b.total / b.floor_total:.2f}" if b.floor_total else "", style="bold")
    return t
