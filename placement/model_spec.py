"""Bytes, parameters and FLOPs of every module of a checkpoint, from its config.json alone.

The planner must answer "does it fit" before anyone downloads 600 GB, so the sizes come from the
config, tensor by tensor in the dtype the checkpoint stores: compressed-tensors INT4 routed experts
(`weight_packed` int32 [out, in/8] + `weight_scale` bf16 [out, in/group] + `weight_shape` int32 [2]),
DeepSeek block FP8 (every linear but embeddings, lm_head and the router gate: `float8_e4m3fn`
weight + fp32 `weight_scale_inv` [ceil(out/128), ceil(in/128)]), BF16 otherwise.
Flat configs and K2.5/K2.6 ones nested under `text_config` (tensors prefixed `language_model.`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from placement.model_config import ModelConfig

DTYPE_BYTES = {"BF16": 2, "F32": 4, "I32": 4, "F8_E4M3": 1}
GROUPS = ("embed", "lm_head", "attention", "router", "shared", "dense")  # what a profile places


class Arch(BaseModel):
    """The dimensions that fix every tensor's size: also a profile's record of its model."""

    model_config = ConfigDict(extra="forbid")
    name: str
    model_type: str
    quant: Literal["int4", "fp8", "bf16"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    first_k_dense_replace: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    group_size: int = 32  # INT4 scale group
    block_size: tuple[int, int] = (128, 128)  # FP8 scale block
    nextn_layers: int = 0  # multi-token-prediction layers stored after the decoder (not run)
    nested: bool = False  # K2.5+: text_config, tensors under `language_model.`

    @classmethod
    def from_config(cls, path: str | Path, name: str | None = None) -> Arch:
        """The dimensions of the checkpoint folder (or config.json) at `path`, named for its folder."""
        path = Path(path)
        default = path.name if path.is_dir() else (path.parent.name if path.name == "config.json" else path.stem)
        return cls.of(ModelConfig.from_file(path), name or default or "model")

    @classmethod
    def from_dict(cls, data: dict, name: str = "model", source: str = "config.json") -> Arch:
        return cls.of(ModelConfig.from_dict(data, source), name)

    @classmethod
    def of(cls, c: ModelConfig, name: str = "model") -> Arch:
        """The sizing dimensions of a parsed config."""
        q = c.quant
        dims = {f.name: getattr(c, f.name) for f in fields(c) if f.name in cls.model_fields and f.name != "quant"}
        return cls(**dims, name=name, quant="bf16" if q is None else ("fp8" if q.method == "fp8" else "int4"),
                   group_size=q.group_size if q else 32, block_size=q.block_size if q else (128, 128),
                   nested=bool(c.tensor_prefix))

    def digest(self) -> str:
        """Short digest of everything but the name: two checkpoints with equal hashes size alike."""
        dims = self.model_dump(exclude={"name"})
        return hashlib.sha256(json.dumps(dims, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def moe_layers(self) -> range:
        return range(self.first_k_dense_replace, self.num_hidden_layers)

    def is_moe(self, layer: int) -> bool:
        return self.first_k_dense_replace <= layer < self.num_hidden_layers


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    params: int  # logical parameters it stores (0 for scales and shapes)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def _linear(name: str, out: int, inp: int, fmt: str, a: Arch) -> list[Tensor]:
    if fmt == "int4":
        return [Tensor(name + ".weight_packed", "I32", (out, inp // 8), out * inp),
                Tensor(name + ".weight_scale", "BF16", (out, inp // a.group_size), 0),
                Tensor(name + ".weight_shape", "I32", (2,), 0)]
    if fmt == "fp8":
        b0, b1 = a.block_size
        return [Tensor(name + ".weight", "F8_E4M3", (out, inp), out * inp),
                Tensor(name + ".weight_scale_inv", "F32", (-(-out // b0), -(-inp // b1)), 0)]
    return [Tensor(name + ".weight", "BF16", (out, inp), out * inp)]


def _norm(name: str, n: int) -> Tensor:
    return Tensor(name + ".weight", "BF16", (n,), n)


def _mlp(p: str, h: int, inter: int, fmt: str, a: Arch) -> list[Tensor]:
    return (_linear(p + "gate_proj", inter, h, fmt, a) + _linear(p + "up_proj", inter, h, fmt, a)
            + _linear(p + "down_proj", h, inter, fmt, a))


def module_tensors(a: Arch, group: str, layer: int = 0, expert: int = 0) -> list[Tensor]:
    """The stored tensors of one module: a layer's `attention`, `router`, `shared`, `dense`, one
    routed `expert`, `embed`, `lm_head` (with the final norm), or a layer's `mtp` extras."""
    h, lin = a.hidden_size, ("fp8" if a.quant == "fp8" else "bf16")
    pre = "language_model." if a.nested else ""
    p = f"{pre}model.layers.{layer}."
    if group == "embed":
        return [Tensor(f"{pre}model.embed_tokens.weight", "BF16", (a.vocab_size, h), a.vocab_size * h)]
    if group == "lm_head":
        head = [] if a.tie_word_embeddings else [
            Tensor(f"{pre}lm_head.weight", "BF16", (a.vocab_size, h), a.vocab_size * h)]
        return head + [_norm(f"{pre}model.norm", h)]
    if group == "attention":
        s = p + "self_attn."
        heads, qk = a.num_attention_heads, a.qk_nope_head_dim + a.qk_rope_head_dim
        t = [_norm(p + "input_layernorm", h), _norm(p + "post_attention_layernorm", h)]
        if a.q_lora_rank is None:
            t += _linear(s + "q_proj", heads * qk, h, lin, a)
        else:
            t += _linear(s + "q_a_proj", a.q_lora_rank, h, lin, a) + [_norm(s + "q_a_layernorm", a.q_lora_rank)]
            t += _linear(s + "q_b_proj", heads * qk, a.q_lora_rank, lin, a)
        t += _linear(s + "kv_a_proj_with_mqa", a.kv_lora_rank + a.qk_rope_head_dim, h, lin, a)
        t += [_norm(s + "kv_a_layernorm", a.kv_lora_rank)]
        t += _linear(s + "kv_b_proj", heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank, lin, a)
        return t + _linear(s + "o_proj", h, heads * a.v_head_dim, lin, a)
    if group == "dense":
        return _mlp(p + "mlp.", h, a.intermediate_size, lin, a)
    if group == "router":
        e = a.n_routed_experts
        return [Tensor(p + "mlp.gate.weight", "BF16", (e, h), e * h),
                Tensor(p + "mlp.gate.e_score_correction_bias", "F32", (e,), e)]
    if group == "shared":
        if not a.n_shared_experts:
            return []
        return _mlp(p + "mlp.shared_experts.", h, a.moe_intermediate_size * a.n_shared_experts, lin, a)
    if group == "expert":
        fmt = "int4" if a.quant == "int4" else lin
        return _mlp(f"{p}mlp.experts.{expert}.", h, a.moe_intermediate_size, fmt, a)
    if group == "mtp":  # DeepSeek-V3 MTP extras around a full MoE layer
        return ([_norm(p + "enorm", h), _norm(p + "hnorm", h)] + _linear(p + "eh_proj", h, 2 * h, lin, a)
                + [_norm(p + "shared_head.norm", h),
                   Tensor(p + "shared_head.head.weight", "BF16", (a.vocab_size, h), a.vocab_size * h),
                   Tensor(p + "embed_tokens.weight", "BF16", (a.vocab_size, h), a.vocab_size * h)])
    raise ValueError(f"unknown module group {group!r}")


def checkpoint_tensors(a: Arch) -> Iterator[Tensor]:
    """Every text-model tensor the checkpoint stores (vision towers are not counted)."""
    yield from module_tensors(a, "embed")
    for i in range(a.num_hidden_layers + a.nextn_layers):
        yield from module_tensors(a, "attention", i)
        if i < a.first_k_dense_replace:
            yield from module_tensors(a, "dense", i)
            continue
        yield from module_tensors(a, "router", i)
        yield from module_tensors(a, "shared", i)
        for e in range(a.n_routed_experts):
            yield from module_tensors(a, "expert", i, e)
        if i >= a.num_hidden_layers:
            yield from module_tensors(a, "mtp", i)
    yield from module_tensors(a, "lm_head")


INT4_DOT_TAKES = "hidden and expert sizes divisible by 128 and scale groups of 32, 64 or 128"
# The dot backend's prompt path (hybrid/experts/dot_backend.py): where the CPU multiplies bf16 in
# hardware, an expert with this many (token, slot) pairs or more in one call runs as bf16 GEMMs on
# tiles dequantized from its INT4 weights. Measured on Zen 4 (2 cores, `python -m bench.prompt_experts`,
# fresh routes each call): the GEMMs won from 128 pairs an expert (1.40x at mini's size, 1.20x at
# Kimi's) and not at 64 (0.99x, 0.85x); fitted per expert, they break even at ~50 pairs at mini's
# size and ~80 at Kimi's, where an expert's GEMMs cost ~5 ms on 2 cores whatever its tokens.
DOT_GEMM_MIN_TOKENS = 128


def int4_dot_fits(hidden: int, intermediate: int, group: int) -> bool:
    """Whether the runtime's INT4 dot kernel (hybrid/native/int4_moe.cpp) takes experts of these sizes
    (`INT4_DOT_TAKES`): it
    reads 128 values per step and expands one load of scales over groups of 32, 64 or 128."""
    return hidden % 128 == 0 and intermediate % 128 == 0 and group in (32, 64, 128)


def expert_bytes_held(method: str, hidden: int, intermediate: int, group: int) -> int:
    """One routed expert (gate, up, down) as a CPU method holds it in host memory: 4-bit values
    with a 4-byte scale per group for INT4 as stored (kt-kernel's copy keeps fp32 scales, torch's
    packed layout a bf16 scale and zero); kt's AMX layouts one fp32 scale per row; bf16 dequantized."""
    n, rows = 3 * hidden * intermediate, 2 * intermediate + hidden
    return {"int4_kgroup": n // 2 + 4 * n // group, "amx_int4": n // 2 + 4 * rows,
            "amx_int8": n + 4 * rows, "bf16": 2 * n}[method]


@dataclass(frozen=True)
class ModelSpec:
    """Per-module sizes of one model. `bytes[g]`/`params[g]` are per instance: one layer's
    attention/router/shared/dense, one routed expert, the embedding, lm_head with final norm."""

    arch: Arch
    bytes: dict[str, int]
    params: dict[str, int]

    @classmethod
    def from_arch(cls, a: Arch) -> ModelSpec:
        b, p = {}, {}
        for g, layer in (("embed", 0), ("lm_head", 0), ("attention", 0), ("dense", 0),
                         ("router", a.first_k_dense_replace), ("shared", 0), ("expert", 0), ("mtp", 0)):
            ts = module_tensors(a, g, layer)
            b[g], p[g] = sum(t.nbytes for t in ts), sum(t.params for t in ts)
        return cls(a, b, p)

    @classmethod
    def from_config(cls, path: str | Path, name: str | None = None) -> ModelSpec:
        return cls.from_arch(Arch.from_config(path, name))

    def layer_bytes(self, group: str, layer: int) -> int:
        """Bytes of `group` in `layer` as the runtime holds it (0 where the layer has no such module)."""
        a = self.arch
        if group == "attention":
            return self.bytes["attention"]
        if group == "dense":
            return 0 if a.is_moe(layer) else self.bytes["dense"]
        if group == "router":  # held with its gate in fp32, as routing is computed (the checkpoint's is bf16)
            return self.bytes[group] + a.n_routed_experts * a.hidden_size * (4 - 2) if a.is_moe(layer) else 0
        if group == "shared":
            return self.bytes[group] if a.is_moe(layer) else 0
        raise ValueError(f"{group!r} is not a per-layer group")

    def _count(self, table: dict[str, int], nextn: bool) -> int:
        a = self.arch
        layers = a.num_hidden_layers + (a.nextn_layers if nextn else 0)
        moe = layers - a.first_k_dense_replace
        return (table["embed"] + table["lm_head"] + layers * table["attention"]
                + a.first_k_dense_replace * table["dense"]
                + moe * (table["router"] + table["shared"] + a.n_routed_experts * table["expert"])
                + (a.nextn_layers * table["mtp"] if nextn else 0))

    @property
    def total_bytes(self) -> int:
        """What the runtime loads: the decoder, embeddings and head, in stored dtypes."""
        return self._count(self.bytes, nextn=False)

    @property
    def checkpoint_bytes(self) -> int:
        """The download: also the MTP layers the runtime skips (vision towers not counted)."""
        return self._count(self.bytes, nextn=True)

    @property
    def total_params(self) -> int:
        return self._count(self.params, nextn=False)

    @property
    def routed_expert_bytes(self) -> int:
        a = self.arch
        return len(a.moe_layers) * a.n_routed_experts * self.bytes["expert"]

    def expert_host_bytes(self, method: str) -> int:
        """One routed expert as a CPU method holds it."""
        a = self.arch
        return expert_bytes_held(method, a.hidden_size, a.moe_intermediate_size, a.group_size)

    def kv_bytes_per_token_layer(self, dtype: str = "bf16") -> int:
        """MLA latent cache: (kv_lora_rank + qk_rope_head_dim) values per token and layer; FP8 adds
        two fp32 scales (the latent's and the rope key's; hybrid/model/kv_cache.py)."""
        values = self.arch.kv_lora_rank + self.arch.qk_rope_head_dim
        return values + 8 if dtype == "fp8" else 2 * values

    def kv_bytes_per_token(self, dtype: str = "bf16") -> int:
        return self.arch.num_hidden_layers * self.kv_bytes_per_token_layer(dtype)

    @property
    def expert_flops(self) -> int:
        """FLOPs of one routed expert on one token."""
        return 2 * self.params["expert"]

    def attention_flops(self, context: int, absorbed: bool) -> int:
        """One token, one layer: the projections plus attending to `context` earlier tokens.
        Decode uses the absorbed form (scores against the 576-wide latent), prefill the expanded one."""
        a = self.arch
        if absorbed:
            core = 2 * a.num_attention_heads * (2 * a.kv_lora_rank + a.qk_rope_head_dim) * context
        else:
            core = 2 * a.num_attention_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * context
        return 2 * self.params["attention"] + core

    def flops_per_token(self, context: int = 0, absorbed: bool = True) -> int:
        """Whole forward pass for one token: attention at `context`, dense, shared and the
        top-k routed experts, router and lm_head."""
        a = self.arch
        moe = len(a.moe_layers)
        return (a.num_hidden_layers * self.attention_flops(context, absorbed)
                + a.first_k_dense_replace * 2 * self.params["dense"]
                + moe * (2 * self.params["router"] + 2 * self.params["shared"]
                         + a.num_experts_per_tok * self.expert_flops)
                + 2 * self.params["lm_head"])

    @property
    def activation_bytes_per_token(self) -> int:
        """GPU scratch per token of a prefill chunk (bf16): residual and norms, expanded
        attention heads, the widest MLP intermediate."""
        a = self.arch
        qk = a.qk_nope_head_dim + a.qk_rope_head_dim
        mlp = max(a.intermediate_size, (a.num_experts_per_tok + a.n_shared_experts) * a.moe_intermediate_size)
        return 2 * (4 * a.hidden_size + a.num_attention_heads * (2 * qk + a.v_head_dim) + 2 * mlp)
