"""The GGUF export for llama.cpp: routed experts repacked into Q4_0 without changing a value, and
what llama.cpp's deepseek2 cannot compute the same way refused (llama.cpp itself: test_llamacpp.py)."""

import gguf
import pytest
import torch

from bench.gguf_export import check_rope, export, q4_0
from hybrid.model.checkpoint import Checkpoint
from hybrid.quant import dequantize_int4, pack_int4
from hybrid.model.synthetic import kimi_config
from placement.model_config import ModelConfig


def test_q4_0_repack_of_every_routed_expert_is_lossless(tiny_dir, tmp_path):
    path = export(tiny_dir, tmp_path / "tiny.gguf")
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    ckpt = Checkpoint(tiny_dir)
    for layer in ckpt.config.moe_layers:
        experts = ckpt.experts(layer)
        for proj in ("gate", "up", "down"):
            t = stored[f"blk.{layer}.ffn_{proj}_exps.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
            ours = dequantize_int4(getattr(experts, proj), getattr(experts, proj + "_scale"))
            theirs = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(ours.shape)
            assert torch.equal(theirs, ours), f"layer {layer} {proj}"
    assert not list(tmp_path.glob(".tiny.gguf.*"))  # written aside, then renamed


def test_a_scale_fp16_cannot_hold_is_refused():
    q = torch.zeros(1, 32, dtype=torch.int32)
    with pytest.raises(ValueError, match="not exact in fp16"):
        q4_0(pack_int4(q), torch.tensor([[1e-30]], dtype=torch.bfloat16))


def test_yarn_with_mscale_unlike_mscale_all_dim_is_refused():
    check_rope(ModelConfig.from_dict(kimi_config("tiny")))  # Kimi's: both 1.0
    cfg = ModelConfig.from_dict(kimi_config("tiny", rope_scaling={"mscale": 0.707}))
    with pytest.raises(ValueError, match="mscale"):
        check_rope(cfg)
