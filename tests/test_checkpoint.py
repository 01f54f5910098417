"""Config parsing, checkpoint reading and the INT4 / FP8 formats, including every error case."""

import json
import shutil

import pytest
import torch

from hybrid.model.checkpoint import Checkpoint, CheckpointError
from hybrid.model.synthetic import kimi_config, write_checkpoint
from hybrid.quant import dequantize_int4, pack_int4, unpack_int4
from placement.model_config import ConfigError, ModelConfig


def test_int4_pack_unpack_is_exact():
    q = torch.randint(-8, 8, (64, 256), generator=torch.Generator().manual_seed(0))
    packed = pack_int4(q)
    assert packed.dtype == torch.int32 and packed.shape == (64, 32)
    assert torch.equal(unpack_int4(packed).long(), q)


def test_int4_layout_low_nibble_first():
    q = torch.tensor([[1, 0, 0, 0, 0, 0, 0, -8]])
    # stored value = q + 8: nibble 0 holds 9, nibbles 1..6 hold 8, nibble 7 holds 0
    assert pack_int4(q).item() == 0x08888889


def test_int4_dequant_is_offset_times_group_scale():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-8, 8, (4, 64), generator=g)
    scale = torch.rand(4, 2, generator=g).to(torch.bfloat16)
    w = dequantize_int4(pack_int4(q), scale, 32)
    for o in range(4):
        for i in range(64):
            assert w[o, i].item() == pytest.approx(q[o, i].item() * scale[o, i // 32].float().item())


def test_config_reads_kimi_keys(tiny_dir):
    cfg = ModelConfig.from_file(tiny_dir)
    assert cfg.model_type == "kimi_k2" and cfg.quant.method == "compressed-tensors" and cfg.quant.group_size == 32
    assert cfg.rope_scaling.factor == 32.0 and cfg.kv_cache_dim == cfg.kv_lora_rank + cfg.qk_rope_head_dim


def test_nested_text_config_and_prefix(variant_dir):
    folder = variant_dir("nested")
    ckpt = Checkpoint(folder)
    assert ckpt.config.tensor_prefix == "language_model."
    assert "model.embed_tokens.weight" in ckpt
    assert not any(n.startswith("vision_tower") for n in ckpt.names)


@pytest.mark.parametrize("key,value,words", [
    ("scoring_func", "softmax", ["scoring_func", "softmax", "sigmoid"]),
    ("topk_method", "greedy", ["topk_method", "greedy", "noaux_tc"]),
    ("model_type", "llama", ["model_type", "llama", "deepseek_v3"]),
    ("n_group", 3, ["n_group", "3", "divisor"]),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, ["rope_scaling.type", "linear", "yarn"]),
])
def test_unsupported_config_values_name_key_value_and_support(key, value, words):
    cfg = kimi_config("tiny")
    cfg[key] = value
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(cfg)
    for w in words:
        assert w in str(e.value)


def test_unsupported_quantization_names_the_field():
    cfg = kimi_config("tiny")
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    with pytest.raises(ConfigError, match="num_bits"):
        ModelConfig.from_dict(cfg)


def test_missing_required_key():
    cfg = kimi_config("tiny")
    del cfg["kv_lora_rank"]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelConfig.from_dict(cfg)


@pytest.fixture
def broken(tiny_dir, tmp_path):
    """A private copy of the tiny checkpoint to damage."""
    folder = tmp_path / "broken"
    shutil.copytree(tiny_dir, folder)
    return folder


def shards(folder):
    return sorted(folder.glob("model-*.safetensors"))


def test_missing_shard_names_the_file(broken):
    victim = shards(broken)[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name + ".*missing"):
        Checkpoint(broken)


def test_truncated_shard_names_the_file(broken):
    victim = shards(broken)[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=victim.name + ".*truncated"):
        Checkpoint(broken)


def test_corrupt_header_names_the_file(broken):
    victim = shards(broken)[0]
    data = bytearray(victim.read_bytes())
    data[8:16] = b"\xff" * 8
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=victim.name + ".*corrupt"):
        Checkpoint(broken)


def test_missing_tensor_names_the_tensor(broken):
    index = broken / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.layers.1.self_attn.o_proj.weight"]
    index.write_text(json.dumps(data))
    ckpt = Checkpoint(broken)
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.o_proj.weight.*missing"):
        ckpt.weight("model.layers.1.self_attn.o_proj.weight")


def test_shape_disagreeing_with_config_names_file_tensor_and_shapes(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["kv_lora_rank"] = 32
    (broken / "config.json").write_text(json.dumps(cfg))
    ckpt = Checkpoint(broken)
    with pytest.raises(CheckpointError, match=r"model-\d+-of-\d+\.safetensors: tensor "
                                              r"'model.layers.0.self_attn.kv_b_proj.weight' has shape"):
        ckpt.weight("model.layers.0.self_attn.kv_b_proj.weight")


def test_int4_experts_stay_packed(tiny_dir):
    ckpt = Checkpoint(tiny_dir)
    cfg = ckpt.config
    w = ckpt.experts(1)
    assert w.format == "int4" and w.gate.dtype == torch.int32
    assert w.gate.shape == (cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size // 8)
    assert w.down_scale.shape == (cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size // 32)


def test_fp8_weights_dequantize(variant_dir):
    ckpt = Checkpoint(variant_dir("fp8"))
    assert ckpt.stored_format("model.layers.0.self_attn.o_proj") == "fp8"
    w = ckpt.weight("model.layers.0.self_attn.o_proj.weight", torch.float32)
    assert w.dtype == torch.float32 and w.abs().sum() > 0
    assert ckpt.experts(1).format == "float"


def test_generator_is_deterministic_and_atomic(tmp_path):
    a = write_checkpoint(tmp_path / "a", seed=3)
    b = write_checkpoint(tmp_path / "b", seed=3)
    for f in shards(a):
        assert f.read_bytes() == (b / f.name).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
