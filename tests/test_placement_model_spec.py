"""Model spec: sizes from config.json against published figures and against real checkpoint files."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from placement.model_config import ConfigError
from placement.model_spec import Arch, ModelSpec, checkpoint_tensors

FIXTURES = Path(__file__).parent / "fixtures"
KIMI = FIXTURES / "kimi_k2_6_config.json"
DEEPSEEK = FIXTURES / "deepseek_v3_config.json"


def test_kimi_k2_6_totals_match_published_figures():
    spec = ModelSpec.from_config(KIMI)
    # Exact count from the config: 1,026,408,232,448 parameters ("1T" on the model card).
    assert spec.total_params == 1_026_408_232_448
    assert abs(spec.total_params / 1.026e12 - 1) < 0.005
    # The INT4 checkpoint is ~594 GB of text-model tensors (the files add ~0.9 GB of vision tower).
    assert abs(spec.checkpoint_bytes / 594e9 - 1) < 0.005
    assert spec.arch.nested and spec.arch.quant == "int4" and spec.arch.group_size == 32


def test_kimi_expert_and_kv_sizes():
    spec = ModelSpec.from_config(KIMI)
    # gate/up/down [2048, 7168]: int32 packed in/8 + bf16 scale in/32 + two int32 shape values each
    assert spec.bytes["expert"] == 3 * (2048 * 7168 // 2 + 2048 * 7168 // 16 + 8)
    assert spec.kv_bytes_per_token_layer() == (512 + 64) * 2
    assert spec.kv_bytes_per_token() == 61 * 576 * 2
    assert spec.routed_expert_bytes == 60 * 384 * spec.bytes["expert"]


def test_deepseek_v3_fp8_totals():
    spec = ModelSpec.from_config(DEEPSEEK)
    assert spec.arch.quant == "fp8" and spec.arch.block_size == (128, 128) and spec.arch.nextn_layers == 1
    assert abs(spec.total_params / 671e9 - 1) < 0.005  # the paper's 671 B, MTP module excluded
    names = {t.name: t for t in checkpoint_tensors(spec.arch)}
    q_b = names["model.layers.0.self_attn.q_b_proj.weight_scale_inv"]
    assert (q_b.dtype, q_b.shape) == ("F32", (192, 12))  # ceil(24576/128), ceil(1536/128)
    assert names["model.layers.3.mlp.experts.0.down_proj.weight"].dtype == "F8_E4M3"
    assert names["model.embed_tokens.weight"].dtype == "BF16"
    assert names["lm_head.weight"].dtype == "BF16"
    assert names["model.layers.3.mlp.gate.weight"].dtype == "BF16"
    assert "model.layers.61.eh_proj.weight" in names  # MTP layer counted in the download only
    assert spec.checkpoint_bytes > spec.total_bytes


def test_flat_config_with_null_q_lora_rank_uses_q_proj():
    cfg = json.loads(DEEPSEEK.read_text()) | {"q_lora_rank": None}
    names = {t.name for t in checkpoint_tensors(Arch.from_dict(cfg))}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert not any("q_a_proj" in n for n in names)


def test_config_errors_name_the_key(tmp_path):
    cfg = json.loads(DEEPSEEK.read_text())
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        Arch.from_dict(cfg)
    cfg = json.loads(DEEPSEEK.read_text()) | {"quantization_config": {"quant_method": "gptq"}}
    with pytest.raises(ConfigError, match="gptq"):
        Arch.from_dict(cfg)
    with pytest.raises(ConfigError, match="no such file"):
        Arch.from_config(tmp_path / "missing.json")


def test_flops_per_token():
    spec = ModelSpec.from_config(KIMI)
    active = spec.flops_per_token(0) / 2  # without attention scores: 2 FLOPs per active parameter
    assert 30e9 < active < 35e9  # "32 B activated" on the model card


def _stored(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        out.update({k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"})
    return out


@pytest.mark.parametrize("quant,nested,overrides", [("int4", True, {}), ("int4", False, {}), ("fp8", False, {}),
                                                    ("bf16", False, {"q_lora_rank": None})])
def test_spec_matches_a_generated_checkpoint(tmp_path, quant, nested, overrides):
    synthetic = pytest.importorskip("hybrid.model.synthetic")
    folder = synthetic.write_checkpoint(tmp_path / "ckpt", "tiny", seed=0, quant=quant, nested=nested, **overrides)
    arch = Arch.from_config(folder)
    stored = {k: v for k, v in _stored(folder).items() if not k.startswith("vision_tower.")}
    expected = {t.name: (t.dtype, t.shape) for t in checkpoint_tensors(arch)}
    assert stored == expected
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    vision = sum(1 for k in index["weight_map"] if k.startswith("vision_tower."))
    assert vision == (1 if nested else 0)


def test_placement_imports_neither_torch_nor_hybrid():
    code = ("import sys, placement, placement.cost, placement.emit, placement.report, placement.checks; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('hybrid')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
