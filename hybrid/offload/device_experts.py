"""Routed experts resident on a device (a GPU; the CPU plays the part in tests): the profile's
hot experts of one layer, kept in their stored form (INT4 stays packed, as the planner's memory
budget assumes) and dequantized as they run, computing their share of each token."""

from __future__ import annotations

import torch

from hybrid.experts.torch_backend import TorchExperts
from hybrid.experts.weights import ExpertWeights


class DeviceExperts:
    def __init__(self, weights: ExpertWeights, expert_ids: list[int], device: torch.device | str,
                 dtype: torch.dtype = torch.bfloat16):
        self.device = torch.device(device)
        self.local = torch.full((weights.num_experts,), -1, dtype=torch.long)  # global id -> local index
        self.local[expert_ids] = torch.arange(len(expert_ids))
        idx = torch.tensor(expert_ids, dtype=torch.long)
        self._run = TorchExperts(weights.map(lambda t: t[idx].to(self.device)), dtype)
        self.local = self.local.to(self.device)

    def nbytes(self) -> int:
        """Device memory the resident experts hold."""
        return self._run.nbytes()

    def owns(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """Which slots' experts live here: bool, shaped like topk_ids."""
        return self.local[topk_ids.clamp(min=0)].ge(0) & topk_ids.ge(0)

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The weighted sum over the slots whose expert lives here (others contribute nothing)."""
        local = torch.where(self.owns(topk_ids), self.local[topk_ids.clamp(min=0)], -1)
        return self._run.forward(hidden, local, topk_weights)
