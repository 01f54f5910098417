"""A checkpoint folder of ours as one GGUF file for llama.cpp's `deepseek2` architecture: the same
weights, so that llama.cpp can be measured beside the runtime on the same model.

Routed experts are repacked losslessly from compressed-tensors INT4 (group 32, symmetric, bf16
scales) into Q4_0 (blocks of 32: an fp16 scale d and 16 bytes of nibbles, value = (q - 8) * d);
norms, the router and its correction bias in F32, as llama.cpp's own converter writes them (exact
from bf16); every other weight in BF16 as the runtime holds it (or F16). MLA is written as current
llama.cpp reads it: kv_b_proj split per head into attn_k_b (transposed) and attn_v_b. RoPE needs no
permutation: llama.cpp's deepseek2 rotates interleaved pairs, as the checkpoint's weights expect.
There is no vocabulary (`tokenizer.ggml.model = none`, with the model's vocabulary size): llama.cpp
is driven with token ids.

    python -m bench.gguf_export [--preset mini] [--dtype bf16|f16]
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from hybrid.model.checkpoint import PROJS, Checkpoint, tensor_shapes
from hybrid.quant import unpack_int4
from placement.atomic import atomic_file
from placement.model_config import ModelConfig

Q = gguf.GGMLQuantizationType
FLOATS = {"bf16": (torch.bfloat16, Q.BF16), "f16": (torch.float16, Q.F16)}


@dataclass
class Planned:
    """One GGUF tensor, described before its bytes are made, so that the file streams."""

    name: str
    kind: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # in elements, outermost first (GGUF stores it reversed)
    load: Callable[[], torch.Tensor]  # its bytes: uint8 [..., bytes per row]

    @property
    def byte_shape(self) -> tuple[int, ...]:
        block, size = gguf.GGML_QUANT_SIZES[self.kind]
        return (*self.shape[:-1], self.shape[-1] // block * size)


def q4_0(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Compressed-tensors INT4 group 32 (int32 [..., n/8], bf16 [..., n/32]) as Q4_0 blocks,
    uint8 [..., n/32 * 18]. The nibbles keep their value (q + 8); only their order changes: byte j
    of a Q4_0 block holds element j (low nibble) and element j + 16 (high). Refuses a scale that
    fp16 cannot hold exactly (out of its range), which would make the repack lossy."""
    d = scale.to(torch.float16)
    if not torch.equal(d.float(), scale.float()):
        bad = int((d.float() != scale.float()).sum())
        raise ValueError(f"{bad} INT4 group scales are not exact in fp16 (outside its range): Q4_0 would change them")
    u = (unpack_int4(packed) + 8).view(torch.uint8)
    u = u.reshape(*u.shape[:-1], -1, 2, 16)
    nibbles = u[..., 0, :] | (u[..., 1, :] << 4)
    return torch.cat([d.unsqueeze(-1).view(torch.uint8), nibbles], -1).flatten(-2)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def check_rope(cfg: ModelConfig) -> None:
    """llama.cpp's deepseek2 takes YaRN's attention scale from mscale_all_dim alone, which matches
    the checkpoint only where mscale equals it (DeepSeek-V3 and Kimi: both 1.0)."""
    rs = cfg.rope_scaling
    if rs and not (rs.mscale_all_dim and rs.mscale == rs.mscale_all_dim):
        raise ValueError(f"rope_scaling mscale {rs.mscale} with mscale_all_dim {rs.mscale_all_dim}: llama.cpp's "
                         "deepseek2 computes this model's attention differently (it needs the two equal)")


def plan(ckpt: Checkpoint, dtype: str = "bf16") -> list[Planned]:
    """Every tensor of the GGUF file, named as llama.cpp's deepseek2 reads them."""
    cfg, (float_dtype, float_kind) = ckpt.config, FLOATS[dtype]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, cfg.num_hidden_layers)

    def name(hf: str) -> str:
        return names.get_name(hf.replace("e_score_correction_bias", "e_score_correction.bias"),
                              try_suffixes=(".weight", ".bias"))

    def weight(hf: str, torch_dtype: torch.dtype) -> torch.Tensor:
        return _bytes(ckpt.weight(hf, torch_dtype))

    def kv_b(hf: str, part: str) -> torch.Tensor:
        heads, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
        w = ckpt.weight(hf, float_dtype).view(heads, nope + cfg.v_head_dim, cfg.kv_lora_rank)
        return _bytes(w[:, :nope].transpose(1, 2) if part == "k" else w[:, nope:])

    shapes, out = tensor_shapes(cfg), []
    for hf, shape in shapes.items():
        if ".mlp.experts." in hf:
            continue
        if hf.endswith("kv_b_proj.weight"):
            heads, lora = cfg.num_attention_heads, cfg.kv_lora_rank
            out += [Planned(name(hf.replace("kv_b_proj", "k_b_proj")), float_kind, (heads, lora, cfg.qk_nope_head_dim),
                            functools.partial(kv_b, hf, "k")),
                    Planned(name(hf.replace("kv_b_proj", "v_b_proj")), float_kind, (heads, cfg.v_head_dim, lora),
                            functools.partial(kv_b, hf, "v"))]
            continue
        f32 = len(shape) == 1 or hf.endswith("mlp.gate.weight")
        out.append(Planned(name(hf), Q.F32 if f32 else float_kind, shape,
                           functools.partial(weight, hf, torch.float32 if f32 else float_dtype)))
    experts = functools.lru_cache(maxsize=1)(ckpt.experts)  # a layer's three projections, read once

    def q4(layer: int, proj: str) -> torch.Tensor:
        w = experts(layer)
        return q4_0(getattr(w, proj), getattr(w, proj + "_scale"))

    for layer in cfg.moe_layers:
        first = f"model.layers.{layer}.mlp.experts.0."
        if ckpt.stored_format(first + "gate_proj") != "int4":
            raise ValueError(f"{ckpt.folder}: routed experts not in compressed-tensors INT4, the one format repacked")
        for proj in PROJS:
            out.append(Planned(name(f"model.layers.{layer}.mlp.experts.{proj}.weight"), Q.Q4_0,
                               (cfg.n_routed_experts, *shapes[f"{first}{proj}.weight"]),
                               functools.partial(q4, layer, proj.removesuffix("_proj"))))
    return out


def metadata(w: gguf.GGUFWriter, cfg: ModelConfig, title: str) -> None:
    """The deepseek2 hyperparameters, as llama.cpp's converter writes them for DeepseekV3."""
    w.add_name(title)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(cfg.kv_lora_rank)
    w.add_key_length(cfg.kv_cache_dim)
    w.add_value_length(cfg.kv_lora_rank)
    w.add_key_length_mla(cfg.qk_head_dim)
    w.add_value_length_mla(cfg.v_head_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(cfg.qk_rope_head_dim)
    if rs := cfg.rope_scaling:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs.factor)
        w.add_rope_scaling_orig_ctx_len(rs.original_max_position_embeddings)
        w.add_rope_scaling_yarn_beta_fast(rs.beta_fast)
        w.add_rope_scaling_yarn_beta_slow(rs.beta_slow)
        w.add_rope_scaling_yarn_log_mul(0.1 * rs.mscale_all_dim)  # llama.cpp divides the 0.1 back out
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("none")


def export(folder: str | Path, out: str | Path, dtype: str = "bf16",
           progress: Callable[[int, int], None] | None = None) -> Path:
    """Write `folder` as the GGUF file `out` (aside, then renamed: a file that exists is whole),
    one tensor at a time. `progress(done, total)` is called as tensors are written."""
    folder = Path(folder)
    ckpt = Checkpoint(folder)
    check_rope(ckpt.config)
    tensors = plan(ckpt, dtype)
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2])
        metadata(w, ckpt.config, folder.name)
        for t in tensors:
            w.add_tensor_info(t.name, t.byte_shape, np.dtype(np.uint8), math.prod(t.byte_shape), raw_dtype=t.kind)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, t in enumerate(tensors):
            w.write_tensor_data(t.load().numpy())  # the writer checks each size against its plan
            if progress:
                progress(i + 1, len(tensors))
        w.close()
    ckpt.close()
    return Path(out)


def cached(folder: str | Path, dtype: str = "bf16", say: Callable[[str], None] = print) -> Path:
    """The GGUF export of `folder` beside it (`<folder>-<dtype>.gguf`), written on first use."""
    folder = Path(folder)
    out = folder.with_name(f"{folder.name}-{dtype}.gguf")
    if not out.exists():
        from rich.progress import Progress

        say(f"exporting {folder} to {out} (first use)")
        with Progress(transient=True) as bar:
            task = bar.add_task(f"writing {out.name}", total=None)
            export(folder, out, dtype, lambda done, total: bar.update(task, completed=done, total=total))
    return out


def main() -> None:
    from hybrid.default_model import preset_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--dtype", choices=FLOATS, default="bf16")
    args = ap.parse_args()
    print(cached(preset_model(args.preset), args.dtype))


if __name__ == "__main__":
    main()
