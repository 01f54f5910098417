"""The Python face of the runtime: load a checkpoint folder, get logits, generate."""

from __future__ import annotations

from pathlib import Path

import torch

from hybrid.model import dense_kernel
from hybrid.model.batch import ForwardBatch
from hybrid.model.checkpoint import Checkpoint
from hybrid.model.decoder import DeepseekV3
from hybrid.model.kv_cache import KVCache
from hybrid.model.loader import build_model
from hybrid.offload.layout import ExpertBuilder, Layout
from hybrid.offload.stats import ActivationStats
from hybrid.settings import Settings, settings
from placement.model_config import ModelConfig


class HybridModel:
    def __init__(self, decoder: DeepseekV3, folder: Path, settings: Settings, dense_kernel: str = "torch"):
        self.decoder = decoder  # the nn.Module; its own `.model` mirrors the checkpoint's `model.*` names
        self.folder = folder
        self.settings = settings
        self.dense_kernel = dense_kernel  # what runs the dense projections that live on the CPU

    @property
    def layout(self) -> Layout:
        return self.settings.layout

    @property
    def config(self) -> ModelConfig:
        return self.decoder.config

    @property
    def dtype(self) -> torch.dtype:
        """What the model computes in (and its KV cache holds)."""
        return self.decoder.lm_head.weight.dtype

    def forward(self, batch: ForwardBatch, cache: KVCache | None = None,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits of `batch` (its last position per sequence, or the rows `logits_index` picks)."""
        return self.decoder(batch, cache, logits_index=logits_index)

    def warm_up(self) -> None:
        """Run what the first requests would otherwise wait for: a short prefill and decode steps
        of one and of two sequences, on a scratch cache, so the CPU kernels are built (the native
        library, the compiled GEMV where chosen) and each module has run once."""
        cache, zeros = self.new_cache(6), lambda n: torch.zeros(n, dtype=torch.long)
        slots = [torch.arange(0, 3), torch.arange(3, 6)]
        self.forward(ForwardBatch(zeros(4), torch.tensor([0, 1, 0, 1]), [2, 2], [s[:2] for s in slots]), cache)
        self.forward(ForwardBatch.single(zeros(1), 2, slots[0]), cache)
        self.forward(ForwardBatch(zeros(2), torch.tensor([2, 2]), [1, 1], slots), cache)

    def moe_experts(self) -> list:
        """Each MoE layer's routed-expert executor (a HybridExperts), in layer order."""
        return [layer.mlp.experts for layer in self.decoder.model.layers if hasattr(layer.mlp, "experts")]

    def expert_wait_s(self) -> float:
        """Seconds the model has spent waiting for routed experts, over all MoE layers."""
        return sum(experts.wait_s for experts in self.moe_experts())

    def new_cache(self, num_slots: int, device_slots: int | None = None, kv_dtype: str = "bf16") -> KVCache:
        """A latent cache of num_slots, the first device_slots (default all) on the attention devices
        and the rest in host RAM, stored as kv_dtype (bf16 or fp8)."""
        cfg = self.config
        return KVCache(cfg.num_hidden_layers, num_slots, cfg.kv_lora_rank, cfg.qk_rope_head_dim, self.dtype,
                       self.decoder.layer_devices(), device_slots, kv_dtype)

    def logits(self, input_ids, kv_dtype: str | None = None, decode: bool = False) -> torch.Tensor:
        """Float32 logits [T, vocab] of every position: without a cache, or with kv_dtype, attending
        to the latents as a fresh cache stored that way (bf16 or fp8) returns them. With decode, the
        tokens go in one a step, as generation feeds them, so each attends over the cache with the
        absorbed weights (decode's own path) rather than in one prefill."""
        ids = torch.as_tensor(input_ids).reshape(-1)
        positions = torch.arange(ids.numel())
        if kv_dtype is None:
            if decode:
                raise ValueError("decode reads the context from a KV cache: give kv_dtype (bf16 or fp8)")
            return self.forward(ForwardBatch.single(ids), logits_index=positions)
        cache = self.new_cache(ids.numel(), kv_dtype=kv_dtype)
        if not decode:
            return self.forward(ForwardBatch.single(ids, 0, positions), cache, logits_index=positions)
        return torch.cat([self.forward(ForwardBatch.single(ids[pos:pos + 1], pos, positions[:pos + 1]), cache)
                          for pos in range(ids.numel())])

    def generate(self, input_ids, max_new_tokens: int, temperature: float = 0.0, seed: int | None = None,
                 stop_ids: set[int] = frozenset(), return_logits: bool = False, kv_dtype: str = "bf16"):
        """Tokens after the prompt (greedy unless temperature > 0), using the latent KV cache stored
        as kv_dtype. With return_logits, also the float32 logits that chose each token."""
        ids = torch.as_tensor(input_ids).reshape(-1).long()
        cache = self.new_cache(ids.numel() + max_new_tokens, kv_dtype=kv_dtype)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out, steps = [], []
        batch = ForwardBatch.single(ids, 0, torch.arange(ids.numel()))
        for _ in range(max_new_tokens):
            logits = self.forward(batch, cache)[0]
            steps.append(logits)
            if temperature > 0:
                probs = torch.softmax(logits / temperature, -1)
                token = int(torch.multinomial(probs, 1, generator=gen))
            else:
                token = int(logits.argmax())
            out.append(token)
            if token in stop_ids:
                break
            pos = ids.numel() + len(out) - 1
            batch = ForwardBatch.single(torch.tensor([token]), pos, torch.arange(pos + 1))
        return (out, torch.stack(steps)) if return_logits else out


def load_model(path: str | Path, profile=None, device: str | None = None,
               dtype: torch.dtype = torch.bfloat16, progress=None,
               stats: ActivationStats | None = None, dense: str | None = None) -> HybridModel:
    """Load a checkpoint folder.

    `profile` (a placement Profile, a path to one, a runtime Layout, or the Settings that
    `hybrid.settings.settings` made of one) decides where each part runs; an invalid or
    mismatched profile is refused with every problem listed. Without one, every dense module goes
    to `device` (default cpu) and routed experts to the default CPU backend; with one, `device`
    stands in for the GPUs it names. `progress(done, total)` is called as MoE layers load; `stats` records routing.
    `dense`: the kernel of the dense projections on the CPU (`torch`, `onednn` or `compiled`; default: the
    fastest here, see hybrid/model/dense_kernel.py).
    """
    path = Path(path)
    ckpt = Checkpoint(path)
    s = settings(path, profile, device)
    experts = ExpertBuilder(s.layout, ckpt.config, dtype, stats)
    decoder = build_model(ckpt, experts, dtype, progress, s.layout.device_of)
    ckpt.close()
    kernel = dense_kernel.pack(decoder, dense) if dtype == torch.bfloat16 else "torch"
    return HybridModel(decoder, path, s, kernel)

