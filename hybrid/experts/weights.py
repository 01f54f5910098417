"""One MoE layer's routed experts, stacked over experts, in the form the checkpoint stores them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExpertWeights:
    """Routed experts of one layer.

    `int4`: compressed-tensors pack-quantized; `gate`/`up` are int32 [E, I, H/8], `down` int32
    [E, H, I/8], each with a bf16 scale [E, out, in/group]. kt-kernel's K-group INT4 class takes
    these tensors as they are (it copies them into its own buffers at load).
    `float`: `gate`/`up` [E, I, H], `down` [E, H, I] in bf16/fp16/fp32 (FP8 checkpoints are
    dequantized to bf16 on load).
    """

    format: str  # "int4" | "float"
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_scale: torch.Tensor | None = None
    up_scale: torch.Tensor | None = None
    down_scale: torch.Tensor | None = None
    group_size: int = 32

    FIELDS = ("gate", "up", "down", "gate_scale", "up_scale", "down_scale")

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, f) for f in self.FIELDS) if t is not None]

    def map(self, fn) -> "ExpertWeights":
        """The same experts with `fn` applied to every tensor (select experts, copy to a device, ...)."""
        fields = {f: None if getattr(self, f) is None else fn(getattr(self, f)) for f in self.FIELDS}
        return ExpertWeights(self.format, group_size=self.group_size, **fields)

    @property
    def num_experts(self) -> int:
        return self.gate.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.down.shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.gate.shape[1]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())
