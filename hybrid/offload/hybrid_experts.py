"""The prefetch scheduler's unit: one MoE layer's routed experts, split across processors.

It is itself an expert backend, so the model's MoE block stays `submit -> shared expert -> wait`:
- submit hands the CPU backend the slots whose experts are not resident on the GPU and returns;
- wait computes the GPU-resident (hot) experts while the CPU works, then joins the CPU result;
- with deferral, each token's `defer` lowest-weight CPU experts are submitted only after the
  join and their sum is added one MoE layer later, overlapping that layer's attention;
- prompts of `stream_threshold` tokens or more skip the CPU: the layer's CPU experts are streamed
  to the GPU (`ExpertStreamer`) and run there beside the hot ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hybrid.experts.backend import ExpertBackend
from hybrid.offload.device_experts import DeviceExperts
from hybrid.offload.prefill_stream import ExpertStreamer
from hybrid.offload.stats import ActivationStats


@dataclass
class Deferred:
    """Experts of one layer still running on the CPU, to be added by the next MoE layer."""

    backend: ExpertBackend | None = None

    def take(self) -> torch.Tensor | None:
        backend, self.backend = self.backend, None
        return None if backend is None else backend.wait()


class HybridExperts:
    name = "hybrid"

    def __init__(self, layer: int, cpu: ExpertBackend, device: torch.device | str, *,
                 hot: DeviceExperts | None = None, streamer: ExpertStreamer | None = None,
                 stream_threshold: int | None = None, defer: int = 0,
                 carry_in: Deferred | None = None, carry_out: Deferred | None = None,
                 stats: ActivationStats | None = None):
        self.layer, self.cpu, self.device = layer, cpu, torch.device(device)
        self.hot, self.streamer, self.stream_threshold = hot, streamer, stream_threshold
        self.defer = defer if carry_out is not None else 0
        self.carry_in, self.carry_out, self.stats = carry_in, carry_out, stats
        self._args: tuple | None = None
        self._later: tuple | None = None
        self.wait_s = 0.0  # time spent in wait(): GPU-resident experts plus the CPU join

    def streaming(self, tokens: int) -> bool:
        return self.streamer is not None and self.stream_threshold is not None and tokens >= self.stream_threshold

    def submit(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        if self.stats is not None:
            self.stats.record(self.layer, topk_ids)
        self._args = (hidden, topk_ids, topk_weights)
        self._later = None
        if self.streaming(hidden.shape[0]):
            return
        cpu_ids = topk_ids if self.hot is None else topk_ids.masked_fill(self.hot.owns(topk_ids), -1)
        if self.defer:
            later = _lowest(cpu_ids, topk_weights, self.defer)
            self._later = cpu_ids.masked_fill(~later, -1)
            cpu_ids = cpu_ids.masked_fill(later, -1)
        self.cpu.submit(hidden.cpu(), cpu_ids.cpu(), topk_weights.cpu())

    def wait(self) -> torch.Tensor:
        start = time.perf_counter()
        out = self._join()
        self.wait_s += time.perf_counter() - start
        return out

    def _join(self) -> torch.Tensor:
        hidden, topk_ids, topk_weights = self._args
        self._args = None
        if self.streaming(hidden.shape[0]):
            out = self.streamer.forward(self.layer, hidden, topk_ids, topk_weights)
            if self.hot is not None:
                out += self.hot.forward(hidden, topk_ids, topk_weights)
        else:
            out = torch.zeros_like(hidden)
            if self.hot is not None:  # runs on the GPU while the CPU works on its share
                out += self.hot.forward(hidden, topk_ids, topk_weights)
            out += self.cpu.wait().to(self.device, non_blocking=True)
            if self._later is not None:
                self.cpu.submit(hidden.cpu(), self._later.cpu(), topk_weights.cpu())
                self.carry_out.backend = self.cpu
        if self.carry_in is not None:
            earlier = self.carry_in.take()
            if earlier is not None:
                out += earlier.to(self.device)
        return out


def _lowest(ids: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of each token's k lowest-weight slots among those with an expert (ids >= 0)."""
    masked = weights.masked_fill(ids < 0, float("inf"))
    k = min(k, ids.shape[1])
    chosen = torch.zeros_like(ids, dtype=torch.bool)
    chosen.scatter_(1, masked.topk(k, dim=1, largest=False).indices, True)
    return chosen & (ids >= 0)
