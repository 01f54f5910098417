"""Planner: placements on known machines, refusals, stats, and properties over random machines."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from placement import cost
from placement.hardware import CPU, GPU, Hardware, describe, gpu_from_spec, isa_from, parse_gib
from placement.memory import usage
from placement.model_spec import Arch, ModelSpec
from placement.planner import PlanError, Request, Stats, plan

FIXTURES = Path(__file__).parent / "fixtures"
KIMI = ModelSpec.from_config(FIXTURES / "kimi_k2_6_config.json", "kimi-k2.7-code")
DEEPSEEK = ModelSpec.from_config(FIXTURES / "deepseek_v3_config.json", "deepseek-v3")
TINY = ModelSpec.from_arch(Arch.from_dict({
    "vocab_size": 1280, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
    "num_hidden_layers": 3, "first_k_dense_replace": 1, "n_routed_experts": 16, "num_experts_per_tok": 4,
    "n_shared_experts": 1, "num_attention_heads": 4, "q_lora_rank": 96, "kv_lora_rank": 64,
    "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "max_position_embeddings": 131072,
    "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {
        "g": {"weights": {"num_bits": 4, "strategy": "group", "group_size": 32}}}},
}, "tiny"))
XEON = dict(cores=64, numa=2, isa="amx")


def gpu_experts(p) -> int:
    return sum(len(ids) for ids in p.gpu_experts.values())


def test_hardware_descriptions():
    assert parse_gib("24GB") == 24 and parse_gib("1TB") == 1024 and parse_gib("512 GiB") == 512
    assert gpu_from_spec("h100").memory_gib > 79 and gpu_from_spec("RTX 4090=24GB").name == "RTX 4090"
    assert isa_from("amx") == ["amx", "avx512_bf16", "avx512", "avx2"]
    with pytest.raises(ValueError, match="24GB"):
        gpu_from_spec("lots")


def test_hardware_yaml(tmp_path):
    f = tmp_path / "box.yaml"
    f.write_text("gpus: [4090, {name: A6000, memory: 48GB}]\ncpu: {cores: 32, isa: avx512}\nram: 512GB\n"
                 "measured: {host_gbps: 150}\n")
    hw = Hardware.load(f)
    assert [g.memory_gib for g in hw.gpus] == [23.99, 48] and hw.cpu.isa == ["avx512", "avx2"]
    assert hw.ram_gib == 512 and hw.measured.host_gbps == 150


def test_detect_reads_this_machine_and_resolve_replaces_parts():
    from placement.hardware import detect, resolve

    hw = detect()
    assert hw.cpu.cores >= 1 and hw.ram_gib > 0 and set(hw.cpu.isa) <= {"amx", "avx512_bf16", "avx512", "avx2"}
    planned = resolve(gpus=["h100", "h100"], ram="2TB", isa="amx", host_gbps=300)
    assert [g.name for g in planned.gpus] == ["h100", "h100"] and planned.ram_gib == 2048
    assert planned.cpu.has("amx") and planned.measured.host_gbps == 300 and planned.cpu.cores == hw.cpu.cores
    assert resolve(no_gpu=True).gpus == []


def test_one_4090_holds_the_dense_part_and_the_full_context_over_two_tiers():
    p = plan(KIMI, describe(["RTX 4090=23.99GB"], "1TB", **XEON))
    assert p.device_of("attention", 0) == p.device_of("shared", 60) == p.device_of("lm_head") == "cuda:0"
    assert p.device_of("embed") == "cpu"
    kv = p.kv_cache
    assert gpu_experts(p) == 0 and kv.context_length == kv.max_tokens == 262144
    assert 16384 < kv.device_tokens < 131072 and kv.host_tokens == 262144 - kv.device_tokens
    use = usage(p, KIMI)
    assert use["cpu"].kv == kv.host_tokens * KIMI.kv_bytes_per_token() and use["cuda:0"].total <= use["cuda:0"].budget
    curve = p.prediction.decode_curve
    assert list(curve) == [8192, 32768, 131072, 262144]
    assert curve[8192] >= curve[32768] > curve[131072] > curve[262144] > 0  # the host tier's reads and FLOPs
    assert (p.cpu.backend, p.cpu.method, p.cpu.threads, p.cpu.threadpools) == ("dot", "int4_kgroup", 64, 2)
    assert p.problems() == []


def test_h100_keeps_experts_and_streams_long_prompts():
    p = plan(KIMI, describe(["H100 PCIe=79.65GB"], "768GB", **XEON))
    assert p.kv_cache.context_length == 262144 and p.kv_cache.device_tokens == 131072
    counts = {len(p.gpu_experts_of(layer)) for layer in range(1, 61)}
    assert max(counts) - min(counts) <= 1 and 1500 < gpu_experts(p) < 3000
    assert 100 < p.prefill.stream_threshold_tokens < 8192


def test_predicted_decode_is_below_the_host_memory_floor():
    """Decode cannot beat reading each token's CPU-resident experts (INT4 values and kt's fp32
    group-32 scales) at the host's bandwidth; counted here by hand for a 200 GB/s host."""
    hw = describe(["H100 PCIe=79.65GB"], "768GB", **XEON)
    p = plan(KIMI, hw.model_copy(update={"measured": hw.measured.model_copy(update={"host_gbps": 200.0})}))
    a = KIMI.arch
    n = 3 * a.hidden_size * a.moe_intermediate_size
    on_cpu = sum(1 - len(p.gpu_experts_of(layer)) / a.n_routed_experts for layer in a.moe_layers)
    ceiling = 200e9 / (on_cpu * a.num_experts_per_tok * (n / 2 + 4 * n / 32))
    assert 0.3 * ceiling < p.prediction.decode_tok_s < ceiling  # 0.65 at this writing: the rest is overlap lost


def test_decode_curve_charges_the_host_tier_its_kv_reads_and_attention_flops():
    """Past the GPU tier, a decode step's CPU part reads the host tier's latents as stored at the
    host's bandwidth, does the absorbed attention's FLOPs over them at the share of the CPU's peak
    its attention reaches, and with FP8 decodes every latent value on the CPU; counted here by hand
    for Kimi on one 4090 at its full context, in bf16 and FP8."""
    p = plan(KIMI, describe(["RTX 4090=23.99GB"], "1TB", **XEON))
    fig = cost.figures(p.hardware, p.cpu.backend, p.cpu.method, p.cpu.threads)
    a, context = KIMI.arch, p.kv_cache.context_length
    assert cost.tiers(p, context) == (p.kv_cache.device_tokens, p.kv_cache.host_tokens)
    assert cost.tiers(p, 8192) == (8192, 0)
    assert "host KV bytes / host bandwidth" not in cost.decode(p, KIMI, fig, context=8192)[1]
    host = p.kv_cache.host_tokens * a.num_hidden_layers  # host-tier latents a step reads, over all layers
    values = a.kv_lora_rank + a.qk_rope_head_dim
    flops = host * 2 * a.num_attention_heads * (2 * a.kv_lora_rank + a.qk_rope_head_dim)
    attention_s = flops / (fig.attention_tflops) / 1e9  # in ms
    decode_s = host * values / (cost.FP8_DECODE_GVALUES_PER_THREAD * p.hardware.cpu.cores) / 1e6
    steps = {}
    for dtype, per_token in (("bf16", 2 * values), ("fp8", values + 8)):  # FP8: two fp32 scales a token
        p.kv_cache.dtype = dtype
        tok_s, terms = cost.decode(p, KIMI, fig, context=context)
        steps[dtype] = 1 / tok_s
        assert terms["host KV bytes / host bandwidth"] == pytest.approx(host * per_token / fig.host_gbps / 1e6, rel=1e-4)
        assert terms["CPU attention FLOPs / CPU attention rate"] == pytest.approx(attention_s, rel=1e-4)
        assert terms.get("host FP8 latents decoded on the CPU", 0) == pytest.approx(decode_s if dtype == "fp8" else 0,
                                                                                    rel=1e-4)
    assert steps["fp8"] > steps["bf16"]  # the host tier is bound by FLOPs: FP8's decoding is extra time


def test_a_cpu_only_plan_charges_its_whole_context_at_the_cpus_attention_rate():
    """With attention on the CPU, every token of the context is attended as the host tier's are: its
    FLOPs at the share of the CPU's peak that decode attention reaches, counted here by hand for
    Kimi without a GPU at 128K tokens, with no hand-off to another device."""
    p = plan(KIMI, describe([], "1TB", **XEON))
    fig = cost.figures(p.hardware, p.cpu.backend, p.cpu.method, p.cpu.threads)
    a, context = KIMI.arch, 131072
    flops = context * a.num_hidden_layers * 2 * a.num_attention_heads * (2 * a.kv_lora_rank + a.qk_rope_head_dim)
    terms = cost.decode(p, KIMI, fig, context=context)[1]
    assert terms["CPU attention FLOPs / CPU attention rate"] == pytest.approx(
        flops / (fig.attention_tflops) / 1e9, rel=1e-4)
    assert "PCIe transfers" not in terms


def test_cpu_prefill_charges_the_scores_and_the_experts_by_their_kernels():
    """A CPU-only prefill by hand. The attention scores per layer: their products at the scores rate
    and their bytes, 4 a score where the bf16 kernel runs them (AVX512-BF16), 40 on torch's fp32
    path (AVX2). The routed experts: in a 64-token prompt each of tiny's 16 experts meets ~16 of its
    4-per-token pairs, so they stay on the dot kernel, at its rate times the share of its lanes that
    rows of 256 and 128 values fill (1/2 and 1/4 of 16: 3 / (2 * 2 + 4) = 0.375; Kimi's rows fill
    every lane); in a 1,024-token prompt each meets ~256, so they run as bf16 GEMMs, at the GEMM rate
    plus, per expert and layer, its small ops and its dequantizing. A GPU's attention pays no scores
    term."""
    p = plan(TINY, describe([], "64GB", cores=2, numa=1, isa="avx512_bf16"))
    fig = cost.figures(p.hardware, p.cpu.backend, p.cpu.method, p.cpu.threads)
    a = TINY.arch
    assert p.cpu.backend == "dot" and fig.dot_lanes == 16 and fig.score_bytes == 4 and fig.cpu_gemm_tflops
    assert cost.dot_lane_share(TINY, 16) == pytest.approx(0.375)
    assert cost.dot_lane_share(KIMI, 16) == cost.dot_lane_share(KIMI, 8) == 1.0
    assert cost.gemm_share(32) < 1e-9 and cost.gemm_share(256) > 1 - 1e-6 and 0.4 < cost.gemm_share(128) < 0.6
    moe = len(a.moe_layers)
    for t, gemms in ((64, False), (1024, True)):
        terms = cost.prefill(p, TINY, fig, prompt=t)[1]  # in ms, rounded to 1 us
        scores = a.num_hidden_layers * a.num_attention_heads * t * t
        assert terms["CPU prefill scores: FLOPs / scores rate"] == pytest.approx(
            2 * scores * (a.qk_nope_head_dim + a.qk_rope_head_dim) / fig.scores_tflops / 1e9, rel=1e-3, abs=5e-4)
        assert terms["CPU prefill scores: bytes / host bandwidth"] == pytest.approx(
            scores * 4 / fig.host_gbps / 1e6, rel=1e-3, abs=5e-4)
        rate = fig.cpu_gemm_tflops if gemms else fig.cpu_prefill_tflops * 0.375
        assert terms["CPU expert FLOPs / CPU peak"] == pytest.approx(
            moe * t * a.num_experts_per_tok * TINY.expert_flops / rate / 1e9, rel=1e-3, abs=5e-4)
        dequant = 3 * a.hidden_size * a.moe_intermediate_size / (fig.dequant_gvalues * 1e9)
        assert terms.get("CPU experts as GEMMs: per-expert cost", 0) == pytest.approx(
            moe * a.n_routed_experts * (cost.DOT_GEMM_EXPERT_S + dequant) * 1e3 if gemms else 0, rel=1e-3)
    avx2 = plan(TINY, describe([], "64GB", cores=2, numa=1, isa="avx2"))
    avx2.hardware.measured.cpu_prefill_tflops = 0.5  # a measured rate is the dot kernel's there: still no GEMMs
    avx2_fig = cost.figures(avx2.hardware, avx2.cpu.backend, avx2.cpu.method, avx2.cpu.threads)
    assert avx2_fig.score_bytes == 40 and not avx2_fig.cpu_gemm_tflops
    assert "CPU experts as GEMMs: per-expert cost" not in cost.prefill(avx2, TINY, avx2_fig, prompt=1024)[1]
    gpu = plan(KIMI, describe(["RTX 4090=23.99GB"], "1TB", **XEON))
    gpu_fig = cost.figures(gpu.hardware, gpu.cpu.backend, gpu.cpu.method, gpu.cpu.threads)
    assert not any(k.startswith("CPU prefill scores") for k in cost.prefill(gpu, KIMI, gpu_fig)[1])


def test_no_gpu_gives_a_cpu_only_plan():
    p = plan(KIMI, describe([], "1TB", **XEON))
    assert {p.device_of(g, layer) for g in ("attention", "router", "shared") for layer in range(1, 61)} == {"cpu"}
    assert p.device_of("lm_head") == "cpu" and p.gpu_experts == {} and p.prefill.stream_threshold_tokens is None


def test_fp8_model_on_amx_uses_int8_when_it_fits():
    assert plan(DEEPSEEK, describe(["4090"], "1TB", **XEON)).cpu.method == "amx_int8"
    assert plan(DEEPSEEK, describe(["4090"], "512GB", **XEON)).cpu.method == "amx_int4"

def test_int4_runs_as_stored_on_the_dot_kernel_or_kt_and_float_on_kt():
    """INT4 checkpoints run as stored on the INT4 dot kernel where their sizes fit it (its AVX2 code
    as well), else on kt-kernel's K-group kernel; a float model runs as bf16 on kt where there is
    no AMX to quantize for; without AVX2, the torch backend."""
    p = plan(TINY, describe([], "8GB", cores=4, isa="avx2"))
    assert (p.cpu.backend, p.cpu.method, p.cpu.threads) == ("dot", "int4_kgroup", 4)
    deepseek = plan(DEEPSEEK, describe(["4090"], "2TB", cores=64, isa="avx2"))
    assert (deepseek.cpu.backend, deepseek.cpu.method) == ("kt", "bf16")
    kimi = plan(KIMI, describe(["4090"], "1TB", cores=64, isa="avx2"))
    assert (kimi.cpu.backend, kimi.cpu.method) == ("dot", "int4_kgroup")
    odd = ModelSpec.from_arch(TINY.arch.model_copy(update={"moe_intermediate_size": 192}))
    assert plan(odd, describe([], "8GB", cores=4, isa="avx2")).cpu.backend == "kt"
    assert plan(TINY, describe([], "8GB", cores=4, isa=[])).cpu.backend == "torch"
    a = KIMI.arch  # 4-bit values and a 4-byte scale per 32 (kt's fp32 copy), for gate, up and down
    per_expert = 3 * a.hidden_size * a.moe_intermediate_size * (0.5 + 4 / 32)
    assert KIMI.expert_host_bytes("int4_kgroup") == per_expert == 3 * 7168 * 2048 * 0.625


@pytest.mark.parametrize("hw,pattern", [
    (describe(["4090"], "256GB", **XEON), r"host RAM.*routed experts 590\.6 GiB.*256\.0 GiB: short by"),
    (describe(["16GB"], "1TB", **XEON), r"GPU-resident weights .* need 20\.0 GiB.*short by at least"),
    (describe(["4090"], "512GB", cores=64, isa="avx2"), r"as int4_kgroup on the dot backend.*short by"),
])
def test_impossible_machines_are_refused_with_the_shortfall(hw, pattern):
    with pytest.raises(PlanError, match=pattern):
        plan(KIMI, hw)


def test_a_context_beyond_the_gpu_goes_to_host_ram_as_far_as_it_holds():
    p = plan(KIMI, describe(["4090"], "1TB", **XEON), Request(context=16384, concurrency=2))
    assert (p.kv_cache.max_tokens, p.kv_cache.concurrency, p.kv_cache.host_tokens) == (32768, 2, 0)
    # 620 GB holds the experts and a little more: the served context shrinks to what the host tier holds
    small = plan(KIMI, describe(["4090"], "620GB", **XEON))
    kv = small.kv_cache
    assert kv.device_tokens < kv.context_length < 262144 and kv.host_tokens > 0
    u = usage(small, KIMI)["cpu"]
    assert u.total <= u.budget < u.total + 16 * KIMI.kv_bytes_per_token()
    with pytest.raises(PlanError, match=r"host RAM .* KV [\d.]+ GiB.* short by"):
        plan(KIMI, describe(["4090"], "620GB", **XEON), Request(context=262144))


def test_stats_put_the_most_used_experts_on_the_gpu(tmp_path):
    counts = {str(layer): [1] * 384 for layer in range(1, 61)}
    counts["5"] = [1000 if i in (7, 99) else 1 for i in range(384)]
    f = tmp_path / "stats.json"
    f.write_text(json.dumps({"layers": counts}))
    hw = describe(["H100 PCIe=79.65GB"], "768GB", **XEON)
    p = plan(KIMI, hw, Request(stats=Stats.load(f, KIMI)))
    assert {7, 99} <= set(p.gpu_experts_of(5)) and gpu_experts(p) == gpu_experts(plan(KIMI, hw))
    f.write_text(json.dumps({"layers": {"0": [1] * 384}}))
    with pytest.raises(PlanError, match="layer 0 must be an MoE layer"):
        Stats.load(f, KIMI)


def test_all_experts_on_gpus_bring_the_embedding_along():
    p = plan(TINY, describe(["8GB"], "16GB", cores=8, isa="avx512"))
    assert gpu_experts(p) == 2 * 16 and p.device_of("embed") == "cuda:0"


# ---- properties over random machines ----

# allow_subnormal=False: kt-kernel, once loaded, sets flush-to-zero for the whole process
gpu_sizes = st.floats(min_value=4, max_value=200, allow_subnormal=False).map(lambda x: round(x, 2))
machines = st.builds(
    lambda gpus, ram, cores, numa, isa: Hardware(gpus=[GPU(name="GPU", memory_gib=g) for g in gpus],
                                                 cpu=CPU(cores=cores, numa_nodes=min(numa, cores), isa=isa_from(isa)),
                                                 ram_gib=ram),
    st.lists(gpu_sizes, max_size=4), st.floats(min_value=8, max_value=2048, allow_subnormal=False), st.integers(1, 128),
    st.integers(1, 4), st.sampled_from(["amx", "avx512_bf16", "avx512", "avx2"]))
models = st.sampled_from([KIMI, DEEPSEEK, TINY])
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ample(spec):
    """Machines with room to spare for `spec`, which every planner must place: RAM for three times
    the model, GPUs of 48 GB or more (Kimi's dense part and a context need ~20 GB)."""
    ram = 3 * spec.total_bytes / 2**30 + 32
    return st.builds(
        lambda gpus, extra, cores, numa, isa: Hardware(
            gpus=[GPU(name="GPU", memory_gib=g) for g in gpus],
            cpu=CPU(cores=cores, numa_nodes=min(numa, cores), isa=isa_from(isa)), ram_gib=round(ram + extra, 2)),
        st.lists(st.floats(48, 200, allow_subnormal=False).map(lambda x: round(x, 2)), max_size=4),
        st.floats(0, 1024, allow_subnormal=False), st.integers(1, 128), st.integers(1, 4),
        st.sampled_from(["amx", "avx512_bf16", "avx512", "avx2"]))


def stored_expert_bytes(a) -> int:
    """One routed expert as the checkpoint stores it, by hand: three projections of out x in;
    INT4 packs 8 values an int32 with a bf16 scale per 32 and an int32[2] shape, FP8 is a byte a
    value with an fp32 scale per 128 x 128 block."""
    h, i = a.hidden_size, a.moe_intermediate_size
    if a.quant == "int4":
        return sum(o * n // 2 + o * n // 32 * 2 + 8 for o, n in ((i, h), (i, h), (h, i)))
    return sum(o * n + -(-o // 128) * -(-n // 128) * 4 for o, n in ((i, h), (i, h), (h, i)))


@PROPERTY
@given(models, st.data())
def test_every_ample_machine_gets_a_plan_within_each_devices_memory(spec, data):
    """Each GPU's expert and KV bytes counted by hand from the architecture, not by the planner's
    own accounting, and each device within its budget."""
    hw = data.draw(ample(spec))
    p = plan(spec, hw)
    a = spec.arch
    kv_token_layer = (a.kv_lora_rank + a.qk_rope_head_dim) * (1 if p.kv_cache.dtype == "fp8" else 2)
    on_device = p.kv_cache.max_tokens - p.kv_cache.host_tokens  # the rest of the cache lives in host RAM
    use = usage(p, spec)
    for d in range(len(hw.gpus)):
        device = f"cuda:{d}"
        experts = sum(len(p.gpu_experts_of(layer)) for layer in a.moe_layers if p.device_of("router", layer) == device)
        layers = sum(p.device_of("attention", layer) == device for layer in range(a.num_hidden_layers))
        assert use[device].experts == experts * stored_expert_bytes(a)
        assert use[device].kv == layers * on_device * kv_token_layer
    for device, u in use.items():
        assert u.total <= u.budget, device
    assert p.problems() == []


@PROPERTY
@given(models, st.data())
def test_more_gpu_memory_never_means_fewer_experts_or_less_kv(spec, data):
    hw = data.draw(ample(spec).filter(lambda hw: hw.gpus))
    before = plan(spec, hw)
    grown = [g.model_copy(update={"memory_gib": g.memory_gib + data.draw(st.floats(0, 64, allow_subnormal=False))}) for g in hw.gpus]
    after = plan(spec, hw.model_copy(update={"gpus": grown}))
    assert gpu_experts(after) >= gpu_experts(before)
    assert after.kv_cache.max_tokens >= before.kv_cache.max_tokens


@PROPERTY
@given(models, machines)
def test_impossible_machines_name_their_shortfall(spec, hw):
    small = hw.model_copy(update={"ram_gib": 4.0, "gpus": [g.model_copy(update={"memory_gib": 2.0}) for g in hw.gpus]})
    if spec is not TINY:
        with pytest.raises(PlanError, match=r"short by (at least )?\d+\.\d GiB"):
            plan(spec, small)
