"""The runtime allocates what the planner budgets: a plan of Kimi K2 for one 24 GB GPU with
prefill streaming on, run at that plan's proportions on a scaled-down Kimi-format checkpoint (the
CPU standing in for the GPU), holds each part the planner counts within the planner's figure; and
every plan's KV cache, whatever its context, is one the runtime accepts and allocates byte for byte."""

import torch
from hypothesis import example, given, settings as hypothesis_settings, strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

from hybrid.api import load_model
from hybrid.engine import Engine, SamplingParams
from hybrid.model.kv_cache import KVCache as RuntimeKVCache
from hybrid.settings import settings
from hybrid.model.synthetic import write_checkpoint
from placement.hardware import CPU, GPU, Hardware
from placement.memory import MIB, STREAM_GROUP, usage
from placement.model_spec import Arch, ModelSpec
from placement.model_config import ModelConfig
from placement.planner import PlanError, Request, plan
from placement.profile import Devices, KVCache, LayerDevices, ModelSection, Prefill, Profile

from test_placement_profiles import GENERATE, SPECS
from test_profile_validate import DEEPSEEK_CONFIG, KIMI_CONFIG

# A 24 GB card beside a CPU without AMX: its kernels are slow enough on long prompts that the
# planner streams experts over PCIe.
MACHINE = Hardware(gpus=[GPU(name="RTX 4090", memory_gib=23.99)],
                   cpu=CPU(name="16-core AVX-512", cores=16, isa=["avx512_bf16", "avx512", "avx2"]), ram_gib=768)
THRESHOLD = 64  # tokens: the scaled model's prompts of this length or more stream


def scaled(kimi: Profile, arch: Arch) -> Profile:
    """`kimi`'s layout for the model `arch`: the same devices, the same share of each layer's
    experts resident on the GPU, a stream buffer of the same number of experts, its CPU section."""
    spec = ModelSpec.from_arch(arch)
    moe = kimi.model.moe_layers
    share = sum(len(kimi.gpu_experts_of(layer)) for layer in moe) / len(moe) / kimi.model.n_routed_experts
    buffer_experts = kimi.prefill.stream_buffer_mib["cuda:0"] * MIB // ModelSpec.from_arch(kimi.model).bytes["expert"]
    gpu = kimi.device_of("attention", 0)
    tokens = 4096
    return Profile(
        version=kimi.version, model=ModelSection(**arch.model_dump(), config_hash=arch.digest()),
        hardware=kimi.hardware,
        devices=Devices(embed=kimi.devices.embed, lm_head=kimi.devices.lm_head, layers=[LayerDevices(
            first=0, last=arch.num_hidden_layers - 1, attention=gpu, router=gpu, shared=gpu, dense=gpu)]),
        gpu_experts={layer: list(range(max(1, round(share * arch.n_routed_experts)))) for layer in arch.moe_layers},
        cpu=kimi.cpu,
        kv_cache=KVCache(page_size=16, max_tokens=tokens, max_pages=tokens // 16, context_length=tokens,
                         concurrency=1),
        prefill=Prefill(chunk_tokens=kimi.prefill.chunk_tokens, stream_threshold_tokens=THRESHOLD,
                        stream_buffer_mib={gpu: -(-buffer_experts * spec.bytes["expert"] // MIB)}),
        decode=kimi.decode)


def test_what_the_runtime_allocates_is_within_what_the_planner_budgets(models_dir):
    kimi = plan(ModelSpec.from_config(KIMI_CONFIG), MACHINE, Request(context=16384))
    assert [r.attention for r in kimi.devices.layers] == ["cuda:0"]
    assert kimi.prefill.stream_threshold_tokens is not None, "the plan must stream long prompts"
    kimi_expert = ModelSpec.from_arch(kimi.model).bytes["expert"]
    assert kimi.prefill.stream_buffer_mib["cuda:0"] * MIB // kimi_expert == 2 * STREAM_GROUP  # not 2 x 384
    assert usage(kimi, ModelSpec.from_arch(kimi.model))["cuda:0"].total <= MACHINE.gpus[0].budget_bytes

    folder = write_checkpoint(models_dir / "kimi_shaped", seed=4, hidden_size=1024, moe_intermediate_size=512,
                              n_routed_experts=48, num_experts_per_tok=8, num_hidden_layers=4)
    arch = Arch.from_config(folder)
    profile = scaled(kimi, arch)
    assert profile.problems(arch) == []
    budget = usage(profile, profile.spec())["cuda:0"]

    model = load_model(folder, profile, device="cpu", dense="torch")  # the CPU plays cuda:0
    engine = Engine(model)
    prompt = torch.randint(0, arch.vocab_size, (3 * THRESHOLD,), generator=torch.Generator().manual_seed(0))
    engine.generate([prompt.tolist()], SamplingParams(temperature=0, max_tokens=2))

    experts = model.moe_experts()
    streamers = {id(e.streamer): e.streamer for e in experts}.values()
    assert all(e.streaming(len(prompt)) for e in experts)
    stream = sum(s.nbytes() for s in streamers)
    assert 0 < stream <= budget.stream, (stream, budget.stream)
    # the staging slots hold the plan's number of experts: 2 x 8, as for Kimi
    [streamer] = streamers
    layer = streamer.layers[arch.moe_layers[0]]
    assert stream == 2 * STREAM_GROUP * layer.nbytes() // layer.num_experts
    hot = sum(e.hot.nbytes() for e in experts)
    assert 0 < hot <= budget.experts, (hot, budget.experts)
    kv = engine.runner.cache.nbytes("cpu")
    assert 0 < kv <= budget.kv, (kv, budget.kv)
    on_gpu = [p for name, p in model.decoder.named_parameters() if not name.startswith("model.embed_tokens")]
    weights = sum(p.nbytes for p in on_gpu) + sum(
        b.nbytes for name, b in model.decoder.named_buffers() if not name.startswith("rope"))
    assert 0 < weights <= budget.weights, (weights, budget.weights)


CONFIGS = {"kimi-k2.7-code": KIMI_CONFIG, "deepseek-v3": DEEPSEEK_CONFIG}
MACHINES = [(s.model, s.hardware) for s in GENERATE.SHIPPED if s.model in CONFIGS] + [("kimi-k2.7-code", MACHINE)]


def runtime_kv_bytes(config, profile: Profile) -> dict[str, int]:
    """Bytes of KV cache per device that the runtime allocates for `profile`: its settings, the
    engine's page count and the model runner's cache, built as fake tensors (shapes, no memory)."""
    s, cfg = settings(config, profile), ModelConfig.from_file(config)
    pages = s.engine.num_pages(cfg, torch.bfloat16.itemsize)
    devices = [s.layout.layer_device(i) for i in range(cfg.num_hidden_layers)]
    with FakeTensorMode():
        cache = RuntimeKVCache(cfg.num_hidden_layers, pages * s.engine.page_size, cfg.kv_lora_rank,
                               cfg.qk_rope_head_dim, torch.bfloat16, devices,
                               s.engine.device_pages(pages) * s.engine.page_size, s.engine.kv_dtype)
    return {str(d): cache.nbytes(d) for d in {*devices, torch.device("cpu")}}


@hypothesis_settings(max_examples=40, deadline=None)
@given(machine=st.sampled_from(MACHINES), data=st.data(), concurrency=st.integers(1, 3),
       kv_dtype=st.sampled_from(["bf16", "fp8"]))
@example(machine=MACHINES[0], data=None, concurrency=1, kv_dtype="bf16")
def test_every_plan_validates_and_its_kv_is_what_the_runtime_allocates(machine, data, concurrency, kv_dtype):
    """Odd contexts (200001, 1000, anything) too: the planner counts the KV cache in the whole pages
    the engine gives each sequence, so the profile passes validation and the runtime's cache takes,
    on each device, exactly the bytes the planner budgets."""
    model, hardware = machine
    spec = SPECS[model]
    limit = spec.arch.max_position_embeddings
    context = 200001 if data is None else data.draw(st.one_of(
        st.none(), st.sampled_from([1000, 200001 % limit, limit - 1]), st.integers(1, limit)))
    try:
        p = plan(spec, hardware, Request(context=context, concurrency=concurrency, kv_dtype=kv_dtype))
    except PlanError:
        return  # this machine cannot hold that context: no profile written
    kv = p.kv_cache
    assert p.problems() == [] and p.problems(Arch.from_config(CONFIGS[model])) == []
    assert kv.context_length == (context or kv.context_length) and kv.slots >= kv.context_length * concurrency
    assert kv.host_tokens % kv.page_size == 0 and kv.slots % kv.page_size == 0
    planned = {d: u.kv for d, u in usage(p, spec).items() if u.kv}
    allocated = {d: n for d, n in runtime_kv_bytes(CONFIGS[model], p).items() if n}
    assert allocated == planned
