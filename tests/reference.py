"""The oracle: transformers' DeepseekV3ForCausalLM built from a generated folder's own files.

Dequantization here is written independently of hybrid's code (straight from the format's
definition), so the reference shares nothing with the implementation under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _dequant_int4(packed: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    rows = packed.shape[0]
    nibbles = [(packed >> (4 * j)) & 0xF for j in range(8)]  # low nibble first
    q = torch.stack(nibbles, dim=-1).reshape(rows, -1).float() - 8
    return q * scale.float().repeat_interleave(group, dim=1)


def _dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: list[int]) -> torch.Tensor:
    s = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return w.float() * s[: w.shape[0], : w.shape[1]]


def reference_folder(model_dir: Path, out_dir: Path) -> Path:
    """A float32 copy of the checkpoint that transformers loads as a plain DeepseekV3."""
    if (out_dir / "config.json").exists():
        return out_dir
    cfg = json.loads((model_dir / "config.json").read_text())
    prefix = ""
    if "text_config" in cfg:
        cfg, prefix = cfg["text_config"], "language_model."
    quant = cfg.pop("quantization_config", None) or {}
    cfg["model_type"] = "deepseek_v3"
    stored = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        stored.update(load_file(f))
    weights = {}
    for name, t in stored.items():
        if not name.startswith(prefix):
            continue
        name = name[len(prefix):]
        if name.endswith(".weight_packed"):
            base = name.removesuffix("_packed")
            group = quant["config_groups"]["group_0"]["weights"]["group_size"]
            weights[base] = _dequant_int4(t, stored[prefix + base + "_scale"], group)
        elif name.endswith((".weight_scale", ".weight_shape", ".weight_scale_inv")):
            continue
        elif t.dtype == torch.float8_e4m3fn:
            weights[name] = _dequant_fp8(t, stored[prefix + name + "_scale_inv"], quant["weight_block_size"])
        else:
            weights[name] = t.float()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(cfg))
    return out_dir


def load_reference(model_dir: Path, out_dir: Path):
    from transformers import DeepseekV3ForCausalLM

    folder = reference_folder(model_dir, out_dir)
    return DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
