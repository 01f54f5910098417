"""What a placement costs in bytes on each device: the one accounting that the planner fills,
`hybrid profile validate` checks and the report prints."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from placement.model_spec import ModelSpec

if TYPE_CHECKING:
    from placement.profile import Profile

GIB = 1 << 30
MIB = 1 << 20
GPU_RESERVE = 1 * GIB  # CUDA context, cuBLAS workspaces, allocator slack
LAYER_GROUPS = ("attention", "router", "shared", "dense")


def host_reserve(ram_bytes: int) -> int:
    """Left to the OS, the Python process and page cache: a quarter of RAM, at most 16 GiB."""
    return min(16 * GIB, ram_bytes // 4)


def workspace_bytes(spec: ModelSpec, chunk_tokens: int) -> int:
    """One GPU's scratch: the fixed reserve plus the activations of one prefill chunk."""
    return GPU_RESERVE + chunk_tokens * spec.activation_bytes_per_token


STREAM_GROUP = 8  # experts staged per PCIe copy when prefill streams


def stream_buffer_bytes(spec: ModelSpec) -> int:
    """Prefill streaming stages STREAM_GROUP experts per copy, double-buffered; in whole MiB (as a
    profile writes it), rounded up so that the runtime's slots hold STREAM_GROUP each."""
    return -(-2 * min(STREAM_GROUP, spec.arch.n_routed_experts) * spec.bytes["expert"] // MIB) * MIB


@dataclass
class Usage:
    budget: int
    weights: int = 0
    experts: int = 0
    kv: int = 0
    workspace: int = 0
    stream: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.experts + self.kv + self.workspace + self.stream


def usage(p: Profile, spec: ModelSpec) -> dict[str, Usage]:
    """Bytes per device ("cuda:N", "cpu") of everything the profile places, against its budget.
    GPU-resident weights count in their stored dtype; CPU experts in the CPU method's layout."""
    a = spec.arch
    out = {f"cuda:{i}": Usage(g.budget_bytes) for i, g in enumerate(p.hardware.gpus)}
    out["cpu"] = Usage(p.hardware.ram_bytes, workspace=host_reserve(p.hardware.ram_bytes))

    def at(device: str) -> Usage:
        return out.setdefault(device, Usage(0))

    at(p.devices.embed).weights += spec.bytes["embed"]
    at(p.devices.lm_head).weights += spec.bytes["lm_head"]
    per_token = spec.kv_bytes_per_token_layer(p.kv_cache.dtype)
    kv_layer, host_kv_layer = p.kv_cache.device_tokens * per_token, p.kv_cache.host_tokens * per_token
    cpu_method_bytes = spec.expert_host_bytes(p.cpu.method)
    for layer in range(a.num_hidden_layers):
        for group in LAYER_GROUPS:
            at(p.device_of(group, layer)).weights += spec.layer_bytes(group, layer)
        at(p.device_of("attention", layer)).kv += kv_layer
        out["cpu"].kv += host_kv_layer
        if a.is_moe(layer):
            n_gpu = len(p.gpu_experts_of(layer))
            at(p.device_of("router", layer)).experts += n_gpu * spec.bytes["expert"]
            out["cpu"].experts += (a.n_routed_experts - n_gpu) * cpu_method_bytes
    for device, u in out.items():
        if device != "cpu" and u.total:
            u.workspace = workspace_bytes(spec, p.prefill.chunk_tokens)
    if any(p.device_of("attention", layer) == "cpu" for layer in range(a.num_hidden_layers)):
        out["cpu"].workspace += p.prefill.chunk_tokens * spec.activation_bytes_per_token
    if p.prefill.stream_threshold_tokens is not None:
        for device, mib in p.prefill.stream_buffer_mib.items():
            at(device).stream += mib * MIB
    return out
