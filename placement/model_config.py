"""Typed model configuration: the one reader of a checkpoint's `config.json`.

Covers `deepseek_v3` and `kimi_k2`, flat or nested under `text_config` (Kimi K2.5/K2.6, whose
text tensors carry a `language_model.` prefix). Every value the math needs comes from the file;
anything we do not implement is refused with the key, the value and what is supported. The
planner sizes a model from it (`model_spec.Arch`) and the runtime builds the model from it, so
what one accepts the other can run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from placement.errors import PlacementError


class ConfigError(PlacementError):
    """A config.json we cannot run, with the key at fault."""


SUPPORTED_MODEL_TYPES = ("deepseek_v3", "kimi_k2")


@dataclass(frozen=True)
class QuantConfig:
    """How the checkpoint's weights are stored beyond plain floats."""

    method: str  # "compressed-tensors" (INT4 pack-quantized routed experts) or "fp8" (block FP8)
    bits: int = 4
    group_size: int = 32
    block_size: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (DeepSeek/Kimi always use yarn when rope_scaling is present)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    num_experts_per_tok: int
    n_shared_experts: int
    first_k_dense_replace: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: RopeScaling | None
    tie_word_embeddings: bool = False
    model_type: str = "deepseek_v3"
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    quant: QuantConfig | None = None
    tensor_prefix: str = ""  # "language_model." for K2.5/K2.6 multimodal checkpoints
    nextn_layers: int = 0  # multi-token-prediction layers stored after the decoder (not run)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values per token and layer in the latent KV cache: normalised latent + shared rope key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling and self.rope_scaling.mscale_all_dim:
            m = yarn_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: not a JSON object")
        prefix = ""
        text = data
        if isinstance(data.get("text_config"), dict):
            text, prefix = data["text_config"], "language_model."
        quant = text.get("quantization_config") or data.get("quantization_config")
        return _parse(text, quant, prefix, source, data)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _require(d: dict, key: str, source: str):
    if key not in d:
        raise ConfigError(f"{source}: missing required key '{key}'")
    return d[key]


_MISSING = object()


def _num(kind: type, d: dict, key: str, source: str, default=_MISSING, where: str = ""):
    """d[key] as an int or a float (`default` when absent or null, else required); a value of
    another type is refused naming the file and the key."""
    value = d.get(key)
    if value is None:
        if default is _MISSING:
            raise ConfigError(f"{source}: missing required key '{where}{key}'")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ConfigError(f"{source}: {where}{key} = {value!r} is not {'an integer' if kind is int else 'a number'} "
                          "(fix: correct it in config.json)")
    return kind(value)


def _check(cond: bool, source: str, key: str, value, supported: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: unsupported {key} = {value!r}; supported: {supported}")


def _parse(d: dict, quant: dict | None, prefix: str, source: str, outer: dict) -> ModelConfig:
    mt = d.get("model_type", "deepseek_v3")
    _check(mt in SUPPORTED_MODEL_TYPES, source, "model_type", mt, ", ".join(SUPPORTED_MODEL_TYPES))
    scoring = d.get("scoring_func", "sigmoid")
    _check(scoring == "sigmoid", source, "scoring_func", scoring, "'sigmoid'")
    topk_method = d.get("topk_method", "noaux_tc")
    _check(topk_method == "noaux_tc", source, "topk_method", topk_method, "'noaux_tc'")
    act = d.get("hidden_act", "silu")
    _check(act == "silu", source, "hidden_act", act, "'silu'")
    freq = d.get("moe_layer_freq", 1)
    _check(freq == 1, source, "moe_layer_freq", freq, "1")
    bias = d.get("attention_bias", False)
    _check(not bias, source, "attention_bias", bias, "false")

    n_experts = _num(int, d, "n_routed_experts", source)
    n_group = _num(int, d, "n_group", source, 1) or 1
    topk_group = _num(int, d, "topk_group", source, 1) or 1
    _check(n_experts % n_group == 0, source, "n_group", n_group, f"a divisor of n_routed_experts ({n_experts})")
    _check(1 <= topk_group <= n_group, source, "topk_group", topk_group, f"1..n_group ({n_group})")
    k = _num(int, d, "num_experts_per_tok", source)
    _check(1 <= k <= n_experts * topk_group // n_group, source, "num_experts_per_tok", k,
           f"1..{n_experts * topk_group // n_group} (experts reachable in topk_group groups)")

    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None

    return ModelConfig(
        vocab_size=_num(int, d, "vocab_size", source),
        hidden_size=_num(int, d, "hidden_size", source),
        intermediate_size=_num(int, d, "intermediate_size", source),
        moe_intermediate_size=_num(int, d, "moe_intermediate_size", source),
        num_hidden_layers=_num(int, d, "num_hidden_layers", source),
        num_attention_heads=_num(int, d, "num_attention_heads", source),
        n_routed_experts=n_experts,
        num_experts_per_tok=k,
        n_shared_experts=_num(int, d, "n_shared_experts", source, 0),
        first_k_dense_replace=_num(int, d, "first_k_dense_replace", source, 0),
        q_lora_rank=_num(int, d, "q_lora_rank", source, None),
        kv_lora_rank=_num(int, d, "kv_lora_rank", source),
        qk_nope_head_dim=_num(int, d, "qk_nope_head_dim", source),
        qk_rope_head_dim=_num(int, d, "qk_rope_head_dim", source),
        v_head_dim=_num(int, d, "v_head_dim", source),
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        routed_scaling_factor=_num(float, d, "routed_scaling_factor", source, 1.0),
        rms_norm_eps=_num(float, d, "rms_norm_eps", source, 1e-6),
        rope_theta=_num(float, d, "rope_theta", source, 10000.0),
        max_position_embeddings=_num(int, d, "max_position_embeddings", source, 4096),
        rope_scaling=_parse_rope_scaling(d.get("rope_scaling"), source),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", outer.get("tie_word_embeddings", False))),
        model_type=mt,
        torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "bfloat16"),
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        quant=_parse_quant(quant, source),
        tensor_prefix=prefix,
        nextn_layers=_num(int, d, "num_nextn_predict_layers", source, 0),
    )


def _parse_rope_scaling(rs: dict | None, source: str) -> RopeScaling | None:
    if not rs:
        return None
    kind = rs.get("type", rs.get("rope_type"))
    _check(kind == "yarn", source, "rope_scaling.type", kind, "'yarn'")
    return RopeScaling(
        factor=_num(float, rs, "factor", source, where="rope_scaling."),
        original_max_position_embeddings=_num(int, rs, "original_max_position_embeddings", source,
                                              where="rope_scaling."),
        beta_fast=_num(float, rs, "beta_fast", source, 32.0, "rope_scaling.") or 32.0,
        beta_slow=_num(float, rs, "beta_slow", source, 1.0, "rope_scaling.") or 1.0,
        mscale=_num(float, rs, "mscale", source, None, "rope_scaling."),
        mscale_all_dim=_num(float, rs, "mscale_all_dim", source, None, "rope_scaling."),
    )


def _parse_quant(q: dict | None, source: str) -> QuantConfig | None:
    if not q:
        return None
    method = q.get("quant_method")
    if method == "fp8":
        block = tuple(q.get("weight_block_size") or (128, 128))
        _check(len(block) == 2, source, "quantization_config.weight_block_size", block, "[rows, cols]")
        return QuantConfig(method="fp8", bits=8, block_size=(int(block[0]), int(block[1])))
    _check(method == "compressed-tensors", source, "quantization_config.quant_method", method,
           "'compressed-tensors' (INT4 pack-quantized) or 'fp8'")
    fmt = q.get("format")
    _check(fmt == "pack-quantized", source, "quantization_config.format", fmt, "'pack-quantized'")
    groups = q.get("config_groups") or {}
    _check(len(groups) == 1, source, "quantization_config.config_groups", list(groups), "exactly one group")
    w = next(iter(groups.values())).get("weights") or {}
    _check(w.get("num_bits") == 4, source, "quantization_config.config_groups.*.weights.num_bits",
           w.get("num_bits"), "4")
    _check(w.get("type", "int") == "int", source, "quantization_config.config_groups.*.weights.type",
           w.get("type"), "'int'")
    _check(w.get("symmetric", True) is True, source,
           "quantization_config.config_groups.*.weights.symmetric", w.get("symmetric"), "true")
    _check(w.get("strategy") == "group", source, "quantization_config.config_groups.*.weights.strategy",
           w.get("strategy"), "'group'")
    gs = _num(int, w, "group_size", source, 0, "quantization_config.config_groups.*.weights.")
    _check(gs > 0 and gs % 8 == 0, source, "quantization_config.config_groups.*.weights.group_size", gs,
           "a positive multiple of 8")
    return QuantConfig(method="compressed-tensors", bits=4, group_size=gs)
