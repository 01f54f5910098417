"""Engine limits: page size, cache capacity and its tiers, context length, how much one step may take."""

from __future__ import annotations

from dataclasses import dataclass

from hybrid.model.config import ModelConfig

# KV cache size when neither the config nor a placement profile gives one.
DEFAULT_KV_CACHE_BYTES = 512 << 20


@dataclass
class EngineConfig:
    page_size: int = 16  # slots per page; also the prefix cache's granularity
    kv_cache_tokens: int | None = None  # None: DEFAULT_KV_CACHE_BYTES worth, at most one full context
    host_kv_tokens: int = 0  # of those, how many live in host RAM (the rest on the attention devices)
    kv_dtype: str = "bf16"  # how the cache stores latents: bf16 or fp8 (e4m3 with scales)
    max_model_len: int | None = None  # longest prompt + reply; None: the model's max_position_embeddings
    max_batch_tokens: int = 512  # tokens per forward step: decode tokens plus prompt chunks
    max_running: int = 64  # sequences decoding at once

    @classmethod
    def from_profile(cls, profile) -> "EngineConfig":
        """The KV cache and prefill chunk a placement Profile planned."""
        kv = profile.kv_cache
        return cls(page_size=kv.page_size, kv_cache_tokens=kv.max_pages * kv.page_size, host_kv_tokens=kv.host_tokens,
                   kv_dtype=kv.dtype, max_model_len=kv.context_length, max_batch_tokens=profile.prefill.chunk_tokens)

    def num_pages(self, model: ModelConfig, dtype_bytes: int) -> int:
        tokens = self.kv_cache_tokens
        if tokens is None:
            per_token = model.num_hidden_layers * (model.kv_lora_rank + model.qk_rope_head_dim) * dtype_bytes
            tokens = min(DEFAULT_KV_CACHE_BYTES // per_token, model.max_position_embeddings)
        return max(1, tokens // self.page_size)

    def device_pages(self, num_pages: int) -> int:
        """Of num_pages, those on the attention devices."""
        return max(0, num_pages - self.host_kv_tokens // self.page_size)
