"""Shipped profiles, `hybrid plan`, and the launch flags for other engines."""

import importlib.util
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hybrid.cli import app
from placement.emit import llamacpp, sglang
from placement.memory import usage
from placement.model_spec import ModelSpec
from placement.profile import Profile

ROOT = Path(__file__).parent.parent
KIMI_CONFIG = ROOT / "tests" / "fixtures" / "kimi_k2_6_config.json"


def _generate():
    spec = importlib.util.spec_from_file_location("profiles_generate", ROOT / "profiles" / "generate.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATE = _generate()
SPECS = GENERATE.models()


def test_every_profile_file_is_generated():
    assert {s.file for s in GENERATE.SHIPPED} == {f.name for f in (ROOT / "profiles").glob("*.yaml")}


@pytest.mark.parametrize("shipped", GENERATE.SHIPPED, ids=lambda s: s.file)
def test_shipped_profile_validates_and_replans_to_the_same_placement(shipped):
    loaded = Profile.load(ROOT / "profiles" / shipped.file)
    assert loaded.problems() == []
    assert GENERATE.replan(shipped, SPECS).model_dump() == loaded.model_dump()
    assert loaded.to_yaml().splitlines()[0] == "version: 1"


def gpu_bytes_by_hand(p: Profile, device: str) -> int:
    """What `device` holds under profile `p`, counted from the architecture alone: bf16 weights
    (FP8 checkpoints: a byte a value, an fp32 scale per 128 x 128 block) for the attention, shared
    and dense layers and the lm_head; the router in fp32 with its fp32 bias; each GPU expert as
    stored (INT4: 4 bits a value, a bf16 scale per 32, an int32[2] shape; FP8 as above); the
    latent cache's device tokens of every layer attended there."""
    m = p.model
    h, heads, fp8 = m.hidden_size, m.num_attention_heads, m.quant == "fp8"

    def linear(out: int, inp: int, fmt: str = "fp8" if fp8 else "bf16") -> int:
        if fmt == "int4":
            return out * inp // 2 + out * inp // 32 * 2 + 8
        return out * inp + -(-out // 128) * -(-inp // 128) * 4 if fmt == "fp8" else 2 * out * inp

    def mlp(inter: int, fmt: str | None = None) -> int:
        return sum(linear(o, n, *([fmt] if fmt else [])) for o, n in ((inter, h), (inter, h), (h, inter)))

    attention = (2 * (2 * h + m.q_lora_rank + m.kv_lora_rank) + linear(m.q_lora_rank, h)
                 + linear(heads * (m.qk_nope_head_dim + m.qk_rope_head_dim), m.q_lora_rank)
                 + linear(m.kv_lora_rank + m.qk_rope_head_dim, h)
                 + linear(heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
                 + linear(h, heads * m.v_head_dim))
    kv_token = (m.kv_lora_rank + m.qk_rope_head_dim) * (1 if p.kv_cache.dtype == "fp8" else 2)
    total = (m.vocab_size * h * 2 + h * 2) * (p.devices.lm_head == device)
    total += m.vocab_size * h * 2 * (p.devices.embed == device)
    for layer in range(m.num_hidden_layers):
        moe = layer >= m.first_k_dense_replace
        if p.device_of("attention", layer) == device:
            total += attention + p.kv_cache.device_tokens * kv_token
        if not moe:
            total += mlp(m.intermediate_size) * (p.device_of("dense", layer) == device)
            continue
        total += mlp(m.moe_intermediate_size * m.n_shared_experts) * (p.device_of("shared", layer) == device)
        if p.device_of("router", layer) == device:
            total += m.n_routed_experts * (h * 4 + 4)
            total += len(p.gpu_experts_of(layer)) * mlp(m.moe_intermediate_size, "int4" if m.quant == "int4" else None)
    return total


@pytest.mark.parametrize("shipped", GENERATE.SHIPPED, ids=lambda s: s.file)
def test_shipped_profile_fits_each_gpu_by_a_count_made_by_hand(shipped):
    """Independent of the planner: each GPU's weights, experts and cache counted from the
    architecture equal the planner's accounting and, with the 1 GiB CUDA reserve and the
    prefill stream buffer, fit the GPU."""
    p = Profile.load(ROOT / "profiles" / shipped.file)
    use = usage(p, ModelSpec.from_arch(p.model))
    for i, gpu in enumerate(p.hardware.gpus):
        device = f"cuda:{i}"
        by_hand = gpu_bytes_by_hand(p, device)
        assert by_hand > 0
        assert use[device].weights + use[device].experts + use[device].kv == by_hand, device
        stream = p.prefill.stream_buffer_mib.get(device, 0) << 20
        assert by_hand + (1 << 30) + stream <= gpu.memory_gib * (1 << 30), device


def test_shipped_kimi_profile_matches_its_checkpoint_config():
    Profile.load(ROOT / "profiles" / "kimi-k2.7-code_1x4090_1tb.yaml", model=KIMI_CONFIG)


def test_runtime_helpers():
    p = Profile.load(ROOT / "profiles" / "kimi-k2.7-code_2x4090_768gb.yaml")
    assert p.device_of("attention", 0) == "cuda:0" and p.device_of("router", 60) == "cuda:1"
    assert p.device_of("embed") == "cpu" and p.device_of("lm_head") == p.device_of("norm") == "cuda:1"
    assert p.gpu_experts_of(0) == [] and len(p.gpu_experts_of(1)) > 0
    with pytest.raises(ValueError, match="layer index"):
        p.device_of("attention")


def test_save_is_atomic_and_round_trips(tmp_path):
    p = Profile.load(ROOT / "profiles" / "tiny_cpu_2core.yaml")
    out = tmp_path / "p.yaml"
    p.save(out, "a note")
    assert out.read_text().startswith("# a note\n") and Profile.load(out) == p
    assert [f.name for f in tmp_path.iterdir()] == ["p.yaml"]


def test_hybrid_plan_prints_the_placement_for_profile_a(tmp_path):
    out = tmp_path / "a.yaml"
    args = ["plan", "--config", str(KIMI_CONFIG), "--name", "kimi-k2.7-code", "--gpu", "RTX 4090=23.99GB",
            "--ram", "1TB", "--cores", "64", "--numa", "2", "--isa", "amx", "--out", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "120"})
    assert result.exit_code == 0, result.output
    text = result.output
    for needle in ("Placement (GiB)", "cuda:0", "layers 0-60: attn, router, shared, dense", "lm_head",
                   "23,040 routed experts (int4_kgroup on dot, 64 threads)", "KV cache: 262,144 tokens",
                   "227,232 in host RAM", "Predicted decode by context", "34,912",
                   "Predicted speed: decode", "CPU expert bytes / host bandwidth", "GPU memory reads", "total"):
        assert needle in text, needle
    shipped = Profile.load(ROOT / "profiles" / "kimi-k2.7-code_1x4090_1tb.yaml")
    written = Profile.load(out)
    assert written.devices == shipped.devices and written.kv_cache == shipped.kv_cache
    # the decode curve, a row per context: the newest tokens on the GPU, the rest in host RAM
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.split()[:1] and
            line.split()[0] in ("8,192", "32,768", "131,072", "262,144")}
    curve = written.prediction.decode_curve
    assert list(curve) == [8192, 32768, 131072, 262144]
    for context, tok_s in curve.items():
        host = max(0, context - 34912)
        assert rows[f"{context:,}"] == [f"{context - host:,}", f"{host:,}", f"{tok_s:g}"], context


def test_hybrid_plan_refusal_is_a_message_not_a_traceback():
    args = ["plan", "--config", str(KIMI_CONFIG), "--gpu", "4090", "--ram", "256GB", "--cores", "64", "--isa", "amx"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    # a machine that cannot hold the model is not a usage error (2): the options were understood
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines()[-1].startswith("error: ") and "short by" in result.stderr


def test_emit_sglang_and_llamacpp():
    p = Profile.load(ROOT / "profiles" / "kimi-k2.7-code_1xh100_768gb.yaml")
    cmd = sglang(p, "/models/kimi")
    for flag in ("--kt-method RAWINT4", "--kt-weight-path /models/kimi", "--kt-cpuinfer 64",
                 "--kt-threadpool-count 2", f"--kt-num-gpu-experts {sum(map(len, p.gpu_experts.values())) // 60}",
                 f"--kt-gpu-prefill-token-threshold {p.prefill.stream_threshold_tokens}",
                 "--tensor-parallel-size 1", "--max-total-tokens 131072"):
        assert flag in cmd, flag
    p2 = Profile.load(ROOT / "profiles" / "kimi-k2.7-code_2x4090_768gb.yaml")
    cmd = llamacpp(p2, p2.spec())
    assert "-ngl 62" in cmd and "--n-cpu-moe 59" in cmd and "--tensor-split 30,31" in cmd and "-c 131072" in cmd
    assert "needs at least one GPU" in sglang(Profile.load(ROOT / "profiles" / "kimi-k2.7-code_cpu_1tb.yaml"))
    ds = Profile.load(ROOT / "profiles" / "deepseek-v3_1x4090_1tb.yaml")
    assert "--kt-method AMXINT8" in sglang(ds) and "--kt-weight-path CPU_WEIGHTS_DIR" in sglang(ds)
