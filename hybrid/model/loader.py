"""Build the decoder from a checkpoint: every dense weight read once into its module, each MoE
layer's routed experts handed to the expert backend that will run them."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from hybrid.experts.backend import ExpertBackend
from hybrid.experts.weights import ExpertWeights
from hybrid.model.checkpoint import Checkpoint, tensor_shapes
from hybrid.model.decoder import DeepseekV3
from hybrid.model.fp8_linear import Fp8Linear
from hybrid.model.rope import Rope

ExpertFactory = Callable[[int, ExpertWeights], ExpertBackend]


def build_model(ckpt: Checkpoint, make_experts: ExpertFactory, dtype: torch.dtype = torch.bfloat16,
                progress: Callable[[int, int], None] | None = None,
                device_of: Callable[[str], torch.device] = lambda name: torch.device("cpu")) -> DeepseekV3:
    """`device_of(tensor name)` says where each dense weight goes (the profile's placement)."""
    cfg = ckpt.config
    experts = {}
    for n, i in enumerate(cfg.moe_layers):
        experts[i] = make_experts(i, ckpt.experts(i, float_dtype=dtype))
        if progress:
            progress(n + 1, len(cfg.moe_layers))
    with torch.device("meta"):
        model = DeepseekV3(cfg, experts)
    for name in tensor_shapes(cfg):
        if ".mlp.experts." in name:
            continue
        module = name.removesuffix(".weight")
        if module.endswith("kv_b_proj"):  # MLA keeps it as two halves, in the compute dtype
            owner = model.get_submodule(module.rpartition(".")[0])
            owner.load_kv_b(to_device(ckpt.weight(name, dtype), device_of(name)))
            continue
        if ckpt.stored_format(module) == "fp8":  # stays FP8 where it lives
            w, s = (to_device(t, device_of(name)) for t in ckpt.fp8(module))
            owner, _, attr = module.rpartition(".")
            setattr(model.get_submodule(owner), attr, Fp8Linear(w, s, ckpt.fp8_block, dtype))
            continue
        float32 = name.endswith(("e_score_correction_bias", "mlp.gate.weight"))  # the router runs in fp32
        _set(model, name, to_device(ckpt.weight(name, torch.float32 if float32 else dtype), device_of(name)))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rope = Rope(cfg)  # built outside the meta device: its frequencies are computed, not loaded
    return model.eval()


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host to device through pinned memory (pageable copies run at a fraction of PCIe speed)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner), attr, nn.Parameter(value, requires_grad=False))
