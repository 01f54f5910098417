"""Multi-head latent attention (MLA), as DeepSeek-V3 / Kimi K2 define it.

Each token is compressed to a 512-dim latent (normalised) plus one 64-dim rope key shared by all
heads; only those are cached. Two ways to attend to them, equal in exact arithmetic:
- expanded (prefill): `kv_b_proj` turns the context's latents into per-head keys and values;
  cheap when many queries share one context.
- absorbed (decode): `kv_b_proj` is folded into the query and the output, so attention runs
  directly on the latents; cheap when few queries read a long context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid.model.batch import ForwardBatch, KVCache
from hybrid.model.config import ModelConfig
from hybrid.model.norm import RMSNorm
from hybrid.model.rope import Rope, apply_rope

# Above this many new tokens per sequence, expanding the latents beats absorbing the weights.
ABSORB_MAX_QUERIES = 16


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = cfg.num_attention_heads
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, self.rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rope: Rope, cache: KVCache | None) -> torch.Tensor:
        n = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(n, self.n_heads, self.nope + self.rope_dim)
        cos, sin = rope.cos_sin(batch.positions)
        q_nope, q_rope = q[..., : self.nope], apply_rope(q[..., self.nope:], cos, sin)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_layernorm(latent), apply_rope(k_rope, cos, sin)

        out = torch.empty(n, self.n_heads, self.v_dim, dtype=x.dtype, device=x.device)
        start = 0
        for i, q_len in enumerate(batch.q_lens):
            rows = slice(start, start + q_len)
            if cache is None:
                ctx_latent, ctx_rope = latent[rows], k_rope[rows]
            else:
                slots = batch.slots[i]
                cache.write(self.layer, slots[-q_len:], latent[rows], k_rope[rows])
                ctx_latent, ctx_rope = cache.read(self.layer, slots)
                ctx_latent, ctx_rope = ctx_latent.to(x.dtype), ctx_rope.to(x.dtype)
            attend = self._absorbed if q_len <= ABSORB_MAX_QUERIES and cache is not None else self._expanded
            out[rows] = attend(q_nope[rows], q_rope[rows], ctx_latent, ctx_rope)
            start += q_len
        return self.o_proj(out.reshape(n, -1))

    def _mask(self, q_len: int, ctx_len: int, device) -> torch.Tensor:
        """Causal mask for the last q_len positions of a ctx_len context: [q_len, ctx_len] bool."""
        q_pos = torch.arange(ctx_len - q_len, ctx_len, device=device)[:, None]
        return torch.arange(ctx_len, device=device)[None, :] <= q_pos

    def _softmax(self, scores: torch.Tensor) -> torch.Tensor:
        q_len, ctx_len = scores.shape[-2:]
        scores = scores.masked_fill(~self._mask(q_len, ctx_len, scores.device), float("-inf"))
        return F.softmax(scores, dim=-1, dtype=torch.float32)

    def _expanded(self, q_nope, q_rope, latent, k_rope) -> torch.Tensor:
        """Per-head keys and values from the latents, then torch's fused attention (a flash
        kernel on the CPU too: no [heads, q, ctx] scores in memory)."""
        ctx = latent.shape[0]
        kv = self.kv_b_proj(latent).view(ctx, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv[..., : self.nope], kv[..., self.nope:]
        q = torch.cat((q_nope, q_rope), -1).transpose(0, 1)
        k = torch.cat((k_nope, k_rope[:, None].expand(ctx, self.n_heads, self.rope_dim)), -1).transpose(0, 1)
        mask = self._mask(q.shape[1], ctx, q.device)
        out = F.scaled_dot_product_attention(q, k, v.transpose(0, 1), attn_mask=mask, scale=self.scale)
        return out.transpose(0, 1)

    def _absorbed(self, q_nope, q_rope, latent, k_rope) -> torch.Tensor:
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope + self.v_dim, self.rank)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]
        q_latent = torch.einsum("qhd,hdc->qhc", q_nope, w_uk)
        scores = torch.einsum("qhc,kc->hqk", q_latent, latent) + torch.einsum("qhr,kr->hqk", q_rope, k_rope)
        probs = self._softmax(scores * self.scale).to(latent.dtype)
        out_latent = torch.einsum("hqk,kc->qhc", probs, latent)
        return torch.einsum("qhc,hdc->qhd", out_latent, w_uv)
