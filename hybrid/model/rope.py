"""Rotary position embedding with YaRN scaling, applied to interleaved pairs (GPT-J style).

DeepSeek/Kimi rotate pairs (x0, x1), (x2, x3), ...; we return the rotated halves concatenated
([evens | odds]), the same layout transformers uses. Queries and keys get the same permutation,
so their dot products, and the cached rope keys, are consistent.
"""

from __future__ import annotations

import math

import torch

from placement.model_config import ModelConfig, yarn_mscale


def inv_freq_and_scale(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies and the cos/sin magnitude (YaRN's attention factor)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0 / pos_freqs, 1.0
    if rs.mscale and rs.mscale_all_dim:
        attention_factor = yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(rs.factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rs.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (rs.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


class Rope(torch.nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.scale = inv_freq_and_scale(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> cos, sin [N, rope_dim / 2] (float32)."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.scale, angles.sin() * self.scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, ..., rope_dim]; cos/sin [N, rope_dim / 2] broadcast over the middle dims."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin = cos.view(shape).to(x), sin.view(shape).to(x)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
