"""Reading a Hugging Face checkpoint folder: safetensors, single file or sharded, lazily.

Tensors are read one at a time from memory-mapped files. Weights come back in the form asked
for: routed experts stay INT4-packed for the CPU kernels (`experts`), everything else is
dequantized on demand (`weight`). Every failure names the file and the tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from hybrid.errors import UserError
from hybrid.experts.weights import ExpertWeights
from hybrid.quant import dequantize_fp8_block, dequantize_int4
from placement.model_config import ModelConfig


class CheckpointError(UserError, ValueError):
    """A checkpoint we cannot read, naming the file and tensor at fault."""


PROJS = ("gate_proj", "up_proj", "down_proj")


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Logical (dequantized) shape of every weight the model reads, by checkpoint name."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (h,)
        s[p + "post_attention_layernorm.weight"] = (h,)
        a = p + "self_attn."
        if cfg.q_lora_rank is None:
            s[a + "q_proj.weight"] = (heads * cfg.qk_head_dim, h)
        else:
            s[a + "q_a_proj.weight"] = (cfg.q_lora_rank, h)
            s[a + "q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            s[a + "q_b_proj.weight"] = (heads * cfg.qk_head_dim, cfg.q_lora_rank)
        s[a + "kv_a_proj_with_mqa.weight"] = (cfg.kv_cache_dim, h)
        s[a + "kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
        s[a + "kv_b_proj.weight"] = (heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        s[a + "o_proj.weight"] = (h, heads * cfg.v_head_dim)
        m = p + "mlp."
        if not cfg.is_moe_layer(i):
            s.update(_mlp_shapes(m, h, cfg.intermediate_size))
            continue
        s[m + "gate.weight"] = (cfg.n_routed_experts, h)
        s[m + "gate.e_score_correction_bias"] = (cfg.n_routed_experts,)
        if cfg.n_shared_experts:
            s.update(_mlp_shapes(m + "shared_experts.", h, cfg.moe_intermediate_size * cfg.n_shared_experts))
        for e in range(cfg.n_routed_experts):
            s.update(_mlp_shapes(f"{m}experts.{e}.", h, cfg.moe_intermediate_size))
    return s


def _mlp_shapes(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    return {prefix + "gate_proj.weight": (inter, hidden), prefix + "up_proj.weight": (inter, hidden),
            prefix + "down_proj.weight": (hidden, inter)}


# What a model folder holds besides its weights: (file, what it is)
FOLDER_FILES = (("config.json", "the model's configuration"), ("tiktoken.model", "the tokenizer"),
                ("tokenizer_config.json", "the tokenizer's special tokens and chat template"))


def check_folder(folder: str | Path) -> Path:
    """`folder` if it looks like a checkpoint this runtime reads (its files are checked as they
    load); else a CheckpointError naming what is missing. Cheap: run it before anything slow."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such model folder (fix: give the folder of a Kimi K2-family "
                              "checkpoint, or leave out --model for the built-in tiny model)")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (fix: give the checkpoint's folder, the one holding "
                              "config.json)")
    for name, what in FOLDER_FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder}: no {name} ({what}) in this folder (fix: download the model's "
                                  f"{name} beside its weights)")
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"{folder}: no *.safetensors weights in this folder (fix: download the model's "
                              "weights into it)")
    return folder


def _data_end(path: Path) -> int:
    """Bytes a safetensors file must have according to its own header."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header; fix: download it again)")
        (n,) = struct.unpack("<Q", raw)
        header = f.read(n)
    if len(header) < n:
        raise CheckpointError(f"{path}: truncated safetensors header (fix: download it again)")
    try:
        meta = json.loads(header)
        ends = [v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (fix: download it again)") from None
    return 8 + n + max(ends, default=0)


class Checkpoint:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder}: no such model folder")
        self.config = ModelConfig.from_file(self.folder)
        self._file_of = self._index()
        self._handles: dict[str, object] = {}
        self._shapes = tensor_shapes(self.config)

    def _index(self) -> dict[str, str]:
        """Map each tensor name (prefix removed; vision and other non-text tensors skipped) to its file."""
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index.name}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")
            weight_map = {}
            for f in files:
                weight_map.update({k: f for k in self._open(f).keys()})
        for f in files:
            path = self.folder / f
            if not path.exists():
                raise CheckpointError(f"{path}: missing, though model.safetensors.index.json lists it (fix: "
                                      "download it)")
            if path.stat().st_size < _data_end(path):
                raise CheckpointError(f"{path}: truncated ({path.stat().st_size:,} bytes; its header needs "
                                      f"{_data_end(path):,}; fix: download it again)")
        prefix = self.config.tensor_prefix
        out = {}
        for name, f in weight_map.items():
            if prefix:
                if not name.startswith(prefix):
                    continue
                name = name[len(prefix):]
            if name.startswith(("model.", "lm_head.")):
                out[name] = f
        return out

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.folder / file), framework="pt")
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise CheckpointError(f"{file}: cannot read safetensors ({e})") from None
        return self._handles[file]

    def close(self) -> None:
        self._handles.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    @property
    def names(self) -> list[str]:
        return list(self._file_of)

    def tensor(self, name: str) -> torch.Tensor:
        """One stored tensor, as stored."""
        if name not in self._file_of:
            raise CheckpointError(f"{self.folder.name}: tensor '{name}' is missing from the checkpoint")
        file = self._file_of[name]
        try:
            return self._open(file).get_tensor(self.config.tensor_prefix + name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor '{name}' ({e})") from None

    def _check(self, name: str, t: torch.Tensor) -> torch.Tensor:
        want = self._shapes.get(name)
        if want is not None and tuple(t.shape) != want:
            raise CheckpointError(f"{self._file_of.get(name, name)}: tensor '{name}' has shape "
                                  f"{tuple(t.shape)}, config.json implies {want}")
        return t

    def stored_format(self, module: str) -> str:
        if module + ".weight_packed" in self:
            return "int4"
        if module + ".weight_scale_inv" in self:
            return "fp8"
        return "float"

    def weight(self, name: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """A weight by checkpoint name ('...q_a_proj.weight'), dequantized to `dtype`."""
        module = name.removesuffix(".weight")
        fmt = self.stored_format(module) if name.endswith(".weight") else "float"
        if fmt == "int4":
            w = dequantize_int4(*self._int4(module), self.config.quant.group_size, dtype)
        elif fmt == "fp8":
            w = dequantize_fp8_block(*self.fp8(module), self.fp8_block, dtype)
        else:
            w = self.tensor(name).to(dtype)
        return self._check(name, w)

    @property
    def fp8_block(self) -> tuple[int, int]:
        return self.config.quant.block_size if self.config.quant else (128, 128)

    def fp8(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A block-FP8 weight as stored: (float8_e4m3fn weight, fp32 scale_inv per block)."""
        return self._check(module + ".weight", self.tensor(module + ".weight")), self.tensor(module + ".weight_scale_inv")

    def _int4(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        packed, scale = self.tensor(module + ".weight_packed"), self.tensor(module + ".weight_scale")
        want = self._shapes.get(module + ".weight")
        group = self.config.quant.group_size if self.config.quant else 32
        if want is not None and (tuple(packed.shape) != (want[0], want[1] // 8)
                                 or tuple(scale.shape) != (want[0], want[1] // group)):
            raise CheckpointError(
                f"{self._file_of[module + '.weight_packed']}: '{module}' INT4 tensors have shapes "
                f"{tuple(packed.shape)} / {tuple(scale.shape)}, config.json implies "
                f"{(want[0], want[1] // 8)} / {(want[0], want[1] // group)}")
        return packed, scale

    def experts(self, layer: int, float_dtype: torch.dtype = torch.bfloat16) -> ExpertWeights:
        """Layer `layer`'s routed experts, stacked: INT4 kept packed; FP8/float as `float_dtype`."""
        cfg = self.config
        base = f"model.layers.{layer}.mlp.experts."
        fmt = self.stored_format(base + "0.gate_proj")
        stacked: dict[str, torch.Tensor] = {}
        for e in range(cfg.n_routed_experts):
            for proj in PROJS:
                module = f"{base}{e}.{proj}"
                parts = dict(zip((proj, proj + "_scale"), self._int4(module))) if fmt == "int4" \
                    else {proj: self.weight(module + ".weight", float_dtype)}
                for key, t in parts.items():
                    if key not in stacked:  # allocate once, copy each expert in: no second full copy
                        stacked[key] = torch.empty((cfg.n_routed_experts, *t.shape), dtype=t.dtype)
                    stacked[key][e] = t
        args = {k.replace("_proj", ""): v for k, v in stacked.items()}
        if fmt == "int4":
            return ExpertWeights("int4", group_size=cfg.quant.group_size, **args)
        return ExpertWeights("float", **args)

