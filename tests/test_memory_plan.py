"""The runtime allocates what the planner budgets: a plan of Kimi K2 for one 24 GB GPU with
prefill streaming on, run at that plan's proportions on a scaled-down Kimi-format checkpoint (the
CPU standing in for the GPU), holds each part the planner counts within the planner's figure."""

import torch

from hybrid.api import load_model
from hybrid.engine import Engine, SamplingParams
from hybrid.model.synthetic import write_checkpoint
from placement.hardware import CPU, GPU, Hardware
from placement.memory import MIB, STREAM_GROUP, usage
from placement.model_spec import Arch, ModelSpec
from placement.planner import Request, plan
from placement.profile import Devices, KVCache, LayerDevices, ModelSection, Prefill, Profile

from test_profile_validate import KIMI_CONFIG

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
    on_gpu = [p for name, p in model.model.named_parameters() if not name.startswith("model.embed_tokens")]
    weights = sum(p.nbytes for p in on_gpu) + sum(
        b.nbytes for name, b in model.model.named_buffers() if not name.startswith("rope"))
    assert 0 < weights <= budget.weights, (weights, budget.weights)
