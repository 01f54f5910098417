"""Every runtime setting, made in one place: the composition root's first half.

A placement profile (or none) is checked once, here, and becomes where each part runs and how
the CPU experts run (a `Layout`) and the engine's KV cache and batching (an `EngineConfig`).
`load_model`, `hybrid serve`, `hybrid bench` and `hybrid profile record` all start from
`settings`; nothing else reads a profile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hybrid.experts.options import ExpertOptions
from hybrid.offload.layout import Layout
from placement.memory import MIB
from placement.model_config import ModelConfig
from placement.model_spec import Arch
from placement.profile import Profile, ProfileError

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

    def num_pages(self, model: ModelConfig, dtype_bytes: int) -> int:
        tokens = self.kv_cache_tokens
        if tokens is None:
            per_token = model.num_hidden_layers * (model.kv_lora_rank + model.qk_rope_head_dim) * dtype_bytes
            tokens = min(DEFAULT_KV_CACHE_BYTES // per_token, model.max_position_embeddings)
        return max(1, tokens // self.page_size)

    def device_pages(self, num_pages: int) -> int:
        """Of num_pages, those on the attention devices."""
        return max(0, num_pages - self.host_kv_tokens // self.page_size)


@dataclass
class Settings:
    layout: Layout = field(default_factory=Layout)
    engine: EngineConfig = field(default_factory=EngineConfig)
    profile: Profile | None = None  # what they were made from (its prediction, for `hybrid bench`)


def settings(folder: str | Path, profile=None, device: str | None = None) -> Settings:
    """The settings of the model at `folder` from `profile`: a placement Profile or the path of
    one (checked against the checkpoint; refused with every problem `hybrid profile validate`
    would print), a runtime `Layout` or `Settings` (taken as they are), or None (everything on
    `device`, default cpu). With a profile, `device` stands in for every GPU the profile names
    (its plan run where that GPU is absent: the tests' CPU plays it)."""
    if isinstance(profile, Settings):
        return profile
    if profile is None or isinstance(profile, Layout):
        return Settings(profile or Layout.on(device or "cpu"))
    if isinstance(profile, (str, Path)):
        profile = Profile.load(profile, model=folder)
    else:
        problems = profile.problems(Arch.from_config(folder))
        if problems:
            raise ProfileError(problems, "profile")
    return Settings(_layout(profile, device), _engine(profile), profile)


def _layout(p: Profile, device: str | None) -> Layout:
    """Where each part runs, as the profile says (every GPU replaced by `device` when given)."""
    def on(d: str) -> str:
        return device if device is not None and d != "cpu" else d

    layers = range(p.model.num_hidden_layers)
    return Layout(
        embed=on(p.device_of("embed")), lm_head=on(p.device_of("lm_head")),
        layers={i: on(p.device_of("attention", i)) for i in layers},
        hot_experts={int(k): list(v) for k, v in p.gpu_experts.items() if v},
        experts=ExpertOptions(backend=p.cpu.backend, method=p.cpu.method, threads=p.cpu.threads),
        stream_threshold=p.prefill.stream_threshold_tokens,
        stream_buffer={on(d): mib * MIB for d, mib in p.prefill.stream_buffer_mib.items()},
        defer=p.decode.defer_experts)


def _engine(p: Profile) -> EngineConfig:
    """The KV cache (its tiers and dtype) and prefill chunk the profile planned."""
    kv = p.kv_cache
    return EngineConfig(page_size=kv.page_size, kv_cache_tokens=kv.slots,
                        host_kv_tokens=kv.host_tokens, kv_dtype=kv.dtype, max_model_len=kv.context_length,
                        max_batch_tokens=p.prefill.chunk_tokens)
