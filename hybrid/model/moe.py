"""Feed-forward blocks: the dense MLP (also the shared expert), the noaux_tc router, and the MoE
layer that sends routed experts to an expert backend while it computes the shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid.experts.backend import ExpertBackend
from hybrid.native import build
from placement.model_config import ModelConfig

# Up to this many tokens a CPU router runs hybrid/native/router.cpp, one call for its dozen small
# ops; more go to torch's ops, whose GEMM a prompt needs.
NATIVE_ROUTER_TOKENS = 16


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Sigmoid scores in fp32; experts chosen by score + correction bias within the best groups;
    weights are the unbiased scores of the chosen, normalised, times routed_scaling_factor."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_ids [T, K] int64, topk_weights [T, K] float32)."""
        if (x.shape[0] <= NATIVE_ROUTER_TOKENS and x.dtype == torch.bfloat16 and x.device.type == "cpu"
                and self.weight.dtype == torch.float32 and build.load() is not None):
            return self._native(x.contiguous())
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias.float()
        if self.topk_group < self.n_group:
            groups = choice.view(x.shape[0], self.n_group, -1)
            group_scores = groups.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_group, dim=-1).indices, True)
            choice = groups.masked_fill(~keep[..., None], float("-inf")).view_as(choice)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.norm:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling

    def _native(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.empty(x.shape[0], self.top_k, dtype=torch.int64)
        weights = torch.empty(x.shape[0], self.top_k, dtype=torch.float32)
        bias = self.e_score_correction_bias.float()
        build.load().hybrid_route(x.shape[0], x.shape[1], self.weight.shape[0], self.top_k, self.n_group,
                                  self.topk_group, int(self.norm), self.scaling, x.data_ptr(),
                                  self.weight.contiguous().data_ptr(), bias.data_ptr(), ids.data_ptr(),
                                  weights.data_ptr())
        return ids, weights


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: ExpertBackend):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = experts
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        self.experts.submit(x, ids, weights)
        shared = self.shared_experts(x) if self.shared_experts is not None else 0
        return self.experts.wait() + shared
