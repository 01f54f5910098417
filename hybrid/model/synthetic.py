"""Small checkpoints in the exact on-disk format of Kimi K2 (there is no model hub here).

`write_checkpoint` writes a complete model folder: a Kimi-style `config.json` (values scaled
down), sharded safetensors with an index, routed experts as compressed-tensors INT4 group-32
(or DeepSeek block FP8, or plain BF16), the fp32 router correction bias, and a tokenizer in
Kimi's format. Deterministic from a seed; written atomically (a folder that exists is complete).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from collections.abc import Mapping
from typing import Callable

import torch
from safetensors.torch import save_file

from hybrid.model.checkpoint import tensor_shapes
from hybrid.quant import quantize_fp8_block, quantize_int4
from hybrid.tokenizer.vocab import write_tokenizer, write_vocabulary
from placement.atomic import atomic_dir
from placement.model_config import ModelConfig

N_SPECIAL = 256

_KIMI_K2 = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "kimi_k2",
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "ep_size": 1,
    "hidden_act": "silu", "initializer_range": 0.02, "moe_layer_freq": 1, "num_nextn_predict_layers": 0,
    "pretraining_tp": 1, "rms_norm_eps": 1e-6, "rope_theta": 50000.0, "scoring_func": "sigmoid",
    "seq_aux": True, "tie_word_embeddings": False, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "use_cache": True, "norm_topk_prob": True, "routed_scaling_factor": 2.827, "n_group": 1, "topk_group": 1,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "kv_lora_rank": 512,
    "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                     "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
}

PRESETS: dict[str, dict] = {
    # Loads and runs in a couple of seconds: tests and the embedded default model.
    "tiny": {"n_base_tokens": 1024, "hidden_size": 256, "num_hidden_layers": 3, "first_k_dense_replace": 1,
             "intermediate_size": 512, "moe_intermediate_size": 128, "n_routed_experts": 16,
             "num_experts_per_tok": 4, "n_shared_experts": 1, "num_attention_heads": 4, "q_lora_rank": 96,
             "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32},
    # Benchmark size: Kimi's head dims and vocabulary, fewer and smaller experts and layers.
    "mini": {"n_base_tokens": 163584, "hidden_size": 2048, "num_hidden_layers": 6, "first_k_dense_replace": 1,
             "intermediate_size": 5632, "moe_intermediate_size": 1024, "n_routed_experts": 64,
             "num_experts_per_tok": 8, "n_shared_experts": 1, "num_attention_heads": 16, "q_lora_rank": 768},
}

_COMPRESSED_TENSORS = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"], "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
                    "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "sparsity_config": {},
}

_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def kimi_config(preset: str = "tiny", quant: str = "int4", **overrides) -> dict:
    """A config.json dict with Kimi K2's keys; `overrides` replace keys (rope_scaling is merged)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = copy.deepcopy(_KIMI_K2)
    values = dict(PRESETS[preset])
    n_base = values.pop("n_base_tokens")
    cfg.update(values, vocab_size=n_base + N_SPECIAL, bos_token_id=n_base, eos_token_id=n_base + 1)
    cfg["rope_scaling"].update(overrides.pop("rope_scaling", None) or {})
    cfg.update(overrides)
    rs = cfg["rope_scaling"]
    cfg["max_position_embeddings"] = int(rs["factor"] * rs["original_max_position_embeddings"]) if rs else 4096
    if quant == "int4":
        cfg["quantization_config"] = copy.deepcopy(_COMPRESSED_TENSORS)
    elif quant == "fp8":
        cfg["quantization_config"] = dict(_FP8)
    elif quant != "bf16":
        raise ValueError(f"unknown quant {quant!r}; choose int4, fp8 or bf16")
    return cfg


def write_checkpoint(path: str | Path, preset: str = "tiny", seed: int = 0, quant: str = "int4",
                     nested: bool = False, shard_mb: int = 512, progress: Callable[[str], None] | None = None,
                     weights: Mapping[str, torch.Tensor] | None = None, tokens: list[bytes] | None = None,
                     **overrides) -> Path:
    """Write a model folder at `path` (nothing is done if it exists). Returns `path`.

    quant: "int4" (routed experts compressed-tensors INT4, as K2-Thinking and later), "fp8"
    (every linear layer DeepSeek block FP8), "bf16". nested: K2.5-style `text_config` with
    `language_model.` tensor prefix and a vision tensor to skip. weights: float tensors by
    checkpoint name (a trained model) instead of random ones; tokens: its tokenizer's base
    vocabulary in rank order (`vocab_size` must be their count + 256).
    """
    path = Path(path)
    if path.exists():
        return path
    text_cfg = kimi_config(preset, quant, **overrides)
    cfg = ModelConfig.from_dict(text_cfg)
    with atomic_dir(path) as tmp:
        if tokens is None:
            write_tokenizer(tmp, cfg.vocab_size - N_SPECIAL, seed)
        elif write_vocabulary(tmp, tokens) != cfg.vocab_size:
            raise ValueError(f"{len(tokens)} tokens + {N_SPECIAL} specials is not vocab_size {cfg.vocab_size}")
        _write_tensors(tmp, cfg, quant, seed, "language_model." if nested else "", shard_mb << 20, progress, weights)
        top = text_cfg
        if nested:
            top = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
                   "text_config": text_cfg, "vision_config": {"hidden_size": 32}}
        (tmp / "config.json").write_text(json.dumps(top, indent=2))
    return path


def _write_tensors(folder: Path, cfg: ModelConfig, quant: str, seed: int, prefix: str, shard_bytes: int,
                   progress, weights: Mapping[str, torch.Tensor] | None) -> None:
    """Stream tensors into shards of about `shard_bytes`, each written as soon as it is full."""
    gen = torch.Generator().manual_seed(seed)
    files: list[list[str]] = []  # tensor names of each written shard
    shard: dict[str, torch.Tensor] = {}
    total = size = 0

    def flush() -> None:
        nonlocal shard, size
        save_file(shard, str(folder / f"shard-{len(files)}.tmp"), metadata={"format": "pt"})
        files.append(list(shard))
        shard, size = {}, 0

    shapes = tensor_shapes(cfg)
    for i, (name, shape) in enumerate(shapes.items()):
        if progress and i % 500 == 0:
            progress(f"tensors {i}/{len(shapes)}")
        stored = _random(name, shape, cfg, quant, gen) if weights is None else _encoded(name, weights[name], cfg, quant)
        for key, t in stored.items():
            shard[prefix + key] = t.contiguous()
            size += t.numel() * t.element_size()
            total += t.numel() * t.element_size()
        if size > shard_bytes:
            flush()
    if prefix:
        shard["vision_tower.patch_embed.weight"] = torch.zeros(32, 3, 2, 2, dtype=torch.bfloat16)
    if shard:
        flush()
    weight_map = {}
    for k, names in enumerate(files):
        file = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        (folder / f"shard-{k}.tmp").rename(folder / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _random(name: str, shape: tuple[int, ...], cfg: ModelConfig, quant: str, gen) -> dict[str, torch.Tensor]:
    """The tensors the checkpoint stores for one logical weight, random but well scaled."""
    if name.endswith("e_score_correction_bias"):
        return _encoded(name, 0.05 * torch.randn(shape, generator=gen), cfg, quant)
    if "norm" in name:
        return _encoded(name, 1 + 0.1 * torch.randn(shape, generator=gen), cfg, quant)
    if "embed_tokens" in name:
        return _encoded(name, torch.randn(shape, generator=gen), cfg, quant)
    std = shape[-1] ** -0.5
    if ".mlp.experts." in name and quant == "int4":
        # uniformly random int32 words are eight uniformly random nibbles: q uniform in [-8, 7]
        module = name.removesuffix(".weight")
        packed = torch.randint(-2**31, 2**31, (shape[0], shape[1] // 8), generator=gen, dtype=torch.int32)
        scale = (std / 4.6) * (0.5 + torch.rand(shape[0], shape[1] // 32, generator=gen))
        return {module + ".weight_packed": packed, module + ".weight_scale": scale.to(torch.bfloat16),
                module + ".weight_shape": torch.tensor(shape, dtype=torch.int32)}
    return _encoded(name, std * torch.randn(shape, generator=gen), cfg, quant)


def _encoded(name: str, w: torch.Tensor, cfg: ModelConfig, quant: str) -> dict[str, torch.Tensor]:
    """One logical weight as the checkpoint stores it: the router bias fp32, routed experts INT4
    (or every linear layer FP8), the rest bf16."""
    module = name.removesuffix(".weight")
    if name.endswith("e_score_correction_bias"):
        return {name: w.float()}
    if ".mlp.experts." in name and quant == "int4":
        packed, scale = quantize_int4(w, cfg.quant.group_size)
        return {module + ".weight_packed": packed, module + ".weight_scale": scale,
                module + ".weight_shape": torch.tensor(w.shape, dtype=torch.int32)}
    linear = w.dim() == 2 and not any(k in name for k in ("lm_head", "embed_tokens")) and not name.endswith("mlp.gate.weight")
    if quant == "fp8" and linear:
        q, scale_inv = quantize_fp8_block(w, cfg.quant.block_size)
        return {name: q, module + ".weight_scale_inv": scale_inv}
    return {name: w.to(torch.bfloat16)}
