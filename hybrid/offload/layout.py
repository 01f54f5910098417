"""What runs where, in the runtime's terms, and the per-layer expert executors built from it.

A `Layout` is made from a placement Profile by `hybrid.settings` (the normal case) or given
directly (tests, and a machine with no profile: everything on one device). The runtime makes no
placement decision of its own: every device, hot expert, threshold and thread count below comes
from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from hybrid.experts.choice import make_backend
from hybrid.experts.options import ExpertOptions
from hybrid.experts.weights import ExpertWeights
from hybrid.offload.device_experts import DeviceExperts
from hybrid.offload.hybrid_experts import Deferred, HybridExperts
from hybrid.offload.prefill_stream import ExpertStreamer
from hybrid.offload.stats import ActivationStats
from placement.memory import STREAM_GROUP
from placement.model_config import ModelConfig

_LAYER = re.compile(r"model\.layers\.(\d+)\.")


@dataclass
class Layout:
    embed: str = "cpu"
    lm_head: str = "cpu"
    layers: dict[int, str] = field(default_factory=dict)  # layer -> device of attention, router, shared, dense
    hot_experts: dict[int, list[int]] = field(default_factory=dict)
    experts: ExpertOptions = field(default_factory=ExpertOptions)
    stream_threshold: int | None = None
    stream_buffer: dict[str, int] = field(default_factory=dict)  # device -> staging bytes (default: STREAM_GROUP x 2)
    defer: int = 0

    @classmethod
    def on(cls, device: str = "cpu", **kw) -> "Layout":
        """Every dense module on `device`, routed experts on the CPU backend."""
        return cls(embed=device, lm_head=device, **kw)

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

    def __init__(self, layout: Layout, cfg: ModelConfig, dtype: torch.dtype,
                 stats: ActivationStats | None = None):
        self.p, self.cfg, self.dtype, self.stats = layout, cfg, dtype, stats
        self.streamers: dict[torch.device, ExpertStreamer] = {}
        self.carry: Deferred | None = None

    def __call__(self, layer: int, weights: ExpertWeights) -> HybridExperts:
        device = self.p.layer_device(layer)
        streamer = None
        hot_ids = self.p.hot_experts.get(layer)
        if self.p.stream_threshold is not None:  # registered first: it may move them to pinned memory
            if device not in self.streamers:
                default = 2 * STREAM_GROUP * weights.nbytes() // weights.num_experts
                self.streamers[device] = ExpertStreamer(device, self.p.stream_buffer.get(str(device), default),
                                                        self.dtype)
            streamer = self.streamers[device]
            streamer.add(layer, weights, sorted(set(range(weights.num_experts)) - set(hot_ids or ())))
            weights = streamer.layers[layer]
        cpu = make_backend(weights, layer, self.p.experts, self.dtype, self.cfg.num_experts_per_tok)
        hot = DeviceExperts(weights, hot_ids, device, self.dtype) if hot_ids else None
        last = layer == self.cfg.moe_layers[-1]
        carry_in, self.carry = self.carry, (None if last else Deferred())
        return HybridExperts(layer, cpu, device, hot=hot, streamer=streamer, stream_threshold=self.p.stream_threshold,
                             defer=self.p.defer, carry_in=carry_in, carry_out=self.carry, stats=self.stats)
