"""What runs where, in the runtime's terms, and the per-layer expert executors built from it.

A `Placement` is read from a placement Profile (the normal case) or given directly (tests, and
a machine with no profile: everything on one device). The runtime makes no placement decision
of its own: every device, hot expert, threshold and thread count below comes from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from hybrid.experts import ExpertOptions, make_backend
from hybrid.experts.weights import ExpertWeights
from hybrid.model.config import ModelConfig
from hybrid.scheduler.device_experts import DeviceExperts
from hybrid.scheduler.hybrid_experts import Deferred, HybridExperts
from hybrid.scheduler.prefill_stream import ExpertStreamer
from hybrid.scheduler.stats import ActivationStats

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass
class Placement:
    embed: str = "cpu"
    lm_head: str = "cpu"
    layers: dict[int, str] = field(default_factory=dict)  # layer -> device of attention, router, shared, dense
    hot_experts: dict[int, list[int]] = field(default_factory=dict)
    experts: ExpertOptions = field(default_factory=ExpertOptions)
    stream_threshold: int | None = None
    defer: int = 0
    kv_tokens: int | None = None
    page_size: int = 16

    @classmethod
    def on(cls, device: str = "cpu", **kw) -> "Placement":
        """Every dense module on `device`, routed experts on the CPU backend."""
        return cls(embed=device, lm_head=device, **kw)

    @classmethod
    def from_profile(cls, profile) -> "Placement":
        cfg_layers = range(profile.model.num_hidden_layers)
        for i in cfg_layers:
            groups = {profile.device_of(g, i) for g in ("attention", "router", "shared", "dense")}
            if len(groups) > 1:
                raise ValueError(f"devices.layers: layer {i} splits attention/router/shared/dense over "
                                 f"{sorted(groups)}; this runtime keeps a layer's modules on one device")
        return cls(
            embed=profile.device_of("embed"), lm_head=profile.device_of("lm_head"),
            layers={i: profile.device_of("attention", i) for i in cfg_layers},
            hot_experts={int(k): list(v) for k, v in profile.gpu_experts.items() if v},
            experts=ExpertOptions(backend=profile.cpu.backend, method=profile.cpu.method, threads=profile.cpu.threads),
            stream_threshold=profile.prefill.stream_threshold_tokens, defer=profile.decode.defer_experts,
            kv_tokens=profile.kv_cache.max_tokens, page_size=profile.kv_cache.page_size)

    def layer_device(self, layer: int) -> torch.device:
        return torch.device(self.layers.get(layer, self.embed))

    def device_of(self, name: str) -> torch.device:
        """Device of a dense weight, by checkpoint tensor name."""
        m = _LAYER.match(name)
        if m:
            return self.layer_device(int(m.group(1)))
        return torch.device(self.embed if name.startswith("model.embed_tokens") else self.lm_head)


class ExpertBuilder:
    """Makes each MoE layer's executor as the loader reaches it, wiring the layers together
    (deferral hands results from one MoE layer to the next; streaming shares one staging area)."""

    def __init__(self, placement: Placement, cfg: ModelConfig, dtype: torch.dtype,
                 stats: ActivationStats | None = None):
        self.p, self.cfg, self.dtype, self.stats = placement, cfg, dtype, stats
        self.streamers: dict[torch.device, ExpertStreamer] = {}
        self.carry: Deferred | None = None

    def __call__(self, layer: int, weights: ExpertWeights) -> HybridExperts:
        device = self.p.layer_device(layer)
        streamer = None
        if self.p.stream_threshold is not None:  # registered first: it may move them to pinned memory
            streamer = self.streamers.setdefault(device, ExpertStreamer(device, self.dtype))
            streamer.add(layer, weights)
            weights = streamer.layers[layer]
        cpu = make_backend(weights, layer, self.p.experts, self.dtype, self.cfg.num_experts_per_tok)
        hot_ids = self.p.hot_experts.get(layer)
        hot = DeviceExperts(weights, hot_ids, device, self.dtype) if hot_ids else None
        last = layer == self.cfg.moe_layers[-1]
        carry_in, self.carry = self.carry, (None if last else Deferred())
        return HybridExperts(layer, cpu, device, hot=hot, streamer=streamer, stream_threshold=self.p.stream_threshold,
                             defer=self.p.defer, carry_in=carry_in, carry_out=self.carry, stats=self.stats)
