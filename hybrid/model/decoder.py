"""The DeepseekV3 / Kimi K2 decoder: embeddings, MLA + (dense MLP | MoE) blocks, norm, lm_head.

Plain modules whose attribute names follow the checkpoint's tensor names, so loading is a walk
over the checkpoint. Routed experts are not parameters here: each MoE layer holds an expert
backend that owns them.
"""

from __future__ import annotations

import torch
from torch import nn

from hybrid.experts.backend import ExpertBackend
from hybrid.model.attention import MLA
from hybrid.model.batch import ForwardBatch
from hybrid.model.kv_cache import KVCache
from hybrid.model.moe import MLP, MoE
from hybrid.model.norm import RMSNorm
from hybrid.model.rope import Rope
from placement.model_config import ModelConfig


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, experts: ExpertBackend | None):
        super().__init__()
        self.self_attn = MLA(cfg, layer)
        self.mlp = MoE(cfg, experts) if cfg.is_moe_layer(layer) else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    @property
    def device(self) -> torch.device:
        return self.input_layernorm.weight.device

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rope: Rope, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: dict[int, ExpertBackend]):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, experts.get(i)) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: dict[int, ExpertBackend]):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, experts)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = Rope(cfg)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, cache: KVCache | None = None,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits of the rows `logits_index` (default: each sequence's last token)."""
        embed = self.model.embed_tokens
        x = embed(batch.input_ids.to(embed.weight.device))
        for layer in self.model.layers:
            x = layer(x.to(layer.device), batch, self.rope, cache)
        rows = batch.last_index if logits_index is None else logits_index
        x = x[rows.to(x.device)].to(self.lm_head.weight.device)
        return self.lm_head(self.model.norm(x)).float()

    def layer_devices(self) -> list[torch.device]:
        return [layer.device for layer in self.model.layers]
