"""The native decode kernels: MLA's (hybrid/native/mla_decode.cpp) on each instruction set this CPU
runs, as accurate as torch's bf16 ops on the same weights against the float32 model; the router's
(router.cpp), choosing as torch's ops do."""

from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hybrid.api import load_model
from hybrid.model import attention
from hybrid.model.batch import ForwardBatch
from hybrid.model.moe import NATIVE_ROUTER_TOKENS, Router
from hybrid.native import build, decode

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
NATIVE_ISAS = [isa for isa in decode.CODES if isa == decode.isa()
               or (isa == "avx2" and decode.isa() is not None)]  # a CPU with AVX512-BF16 runs both
needs_native = pytest.mark.skipif(not NATIVE_ISAS, reason="the native decode kernels need AVX2 and a C++ compiler")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir, dtype=torch.float32)



@needs_native
@pytest.mark.parametrize("isa", NATIVE_ISAS)
@SETTINGS
@given(lengths=st.lists(st.integers(1, 70), min_size=1, max_size=5), seed=st.integers(0, 2**16))
def test_native_decode_attention_is_as_accurate_as_torchs_ops(tiny_dir, model, isa, lengths, seed):
    """A decode step of several sequences through hybrid/native/mla_decode.cpp (projections, norms,
    rope, the cache write, attention with kv_b folded in, o_proj: one call a layer), their contexts
    at scattered slots, against torch's ops on the same bf16 weights, the same input and the same
    cache: in every layer the output is no further from the float32 model's than torch's bf16 ops
    are, and the new latents land in the cache as torch's ops write them."""
    bf16 = load_model(tiny_dir)
    g = torch.Generator().manual_seed(seed)
    ends = torch.tensor([0, *lengths]).cumsum(0).tolist()
    ids = torch.randint(0, model.config.vocab_size, (ends[-1],), generator=g)
    layout = torch.randperm(ends[-1] + 8, generator=g)[:ends[-1]]
    cache = bf16.new_cache(ends[-1] + 8)
    for a, b in zip(ends, ends[1:]):
        if b - a > 1:
            bf16.decoder(ForwardBatch(ids[a:b - 1], torch.arange(b - a - 1), [b - a - 1], [layout[a:b - 1]]), cache)
    step = ForwardBatch(ids[torch.tensor(ends[1:]) - 1], torch.tensor(lengths) - 1, [1] * len(lengths),
                        [layout[a:b] for a, b in zip(ends, ends[1:])])
    x = torch.randn(len(lengths), model.config.hidden_size, generator=g)
    new = layout[torch.tensor(ends[1:]) - 1]

    def attend(m, layer: int, native: bool):
        """The layer's attention output and the cache rows it wrote, from a copy of `cache`."""
        mine = m.new_cache(ends[-1] + 8)
        for theirs, ours in zip(cache.tiers[layer], mine.tiers[layer]):
            ours.data.copy_(theirs.data)
        mla = m.decoder.model.layers[layer].self_attn
        mla.native_decode = native
        try:
            with torch.inference_mode():
                out = mla(x.to(mine.tiers[layer][0].dtype), step, m.decoder.rope, mine)
        finally:
            mla.native_decode = True
        return out, mine.tiers[layer][0].data[new]

    for layer in range(model.config.num_hidden_layers):
        with patch.object(decode, "isa", lambda: isa), \
                patch.object(attention.MLA, "_native_decode", autospec=True,
                             side_effect=attention.MLA._native_decode) as spy:
            ours, ours_kv = attend(bf16, layer, True)
        assert spy.call_count == 1
        theirs, theirs_kv = attend(bf16, layer, False)
        exact, exact_kv = attend(model, layer, False)  # the float32 model
        assert rel(ours, exact) <= 1.5 * rel(theirs, exact) + 1e-3, layer
        assert rel(ours_kv, exact_kv) <= 1.5 * rel(theirs_kv, exact_kv) + 1e-3, layer
        assert rel(ours_kv, theirs_kv) < 0.01


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN's bf16 path needs bf16 instructions")
def test_packing_leaves_the_native_kernels_weights_plain(tiny_dir):
    """`dense_kernel.pack` puts the CPU's projections on oneDNN's layout but those the native decode
    kernel reads in the checkpoint's (MLA's, where the kernel runs here); with the kernel off for a
    module, its projections are packed too, and decode runs torch's ops on them."""
    from hybrid.model import dense_kernel
    from hybrid.model.dense_kernel import OneDNNLinear

    model = load_model(tiny_dir, dense="onednn")
    layer = model.decoder.model.layers[0]
    want = torch.nn.Linear if decode.isa() else OneDNNLinear
    assert all(type(m) is want for m in (layer.self_attn.q_a_proj, layer.self_attn.o_proj))
    assert type(layer.mlp.gate_proj) is OneDNNLinear and type(model.decoder.lm_head) is OneDNNLinear

    plain = load_model(tiny_dir, dense="torch")
    for layer in plain.decoder.model.layers:
        layer.self_attn.native_decode = False
    dense_kernel.pack(plain.decoder, "onednn")
    assert type(plain.decoder.model.layers[0].self_attn.o_proj) is OneDNNLinear
    ids = torch.randint(0, plain.config.vocab_size, (6,), generator=torch.Generator().manual_seed(4))
    with patch.object(attention.MLA, "_native_decode", autospec=True, side_effect=attention.MLA._native_decode) as spy:
        plain.generate(ids, 3)
    assert spy.call_count == 0


@pytest.mark.skipif(build.load() is None, reason="no C++ compiler to build the native kernels")
@pytest.mark.parametrize("groups", [(1, 1), (8, 4), (8, 1)])
@pytest.mark.parametrize("tokens", [1, 3, NATIVE_ROUTER_TOKENS])
@pytest.mark.parametrize("norm", [True, False])
def test_native_router_chooses_and_weighs_as_torchs_ops(groups, tokens, norm):
    """A few tokens through the router on hybrid/native/router.cpp against its torch ops: the same
    experts in the same order, and their weights within fp32 rounding, with and without group
    limits and normalisation. More tokens than it takes go to torch's ops."""
    n_group, topk_group = groups
    cfg = SimpleNamespace(num_experts_per_tok=8, n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                          routed_scaling_factor=2.827, n_routed_experts=64, hidden_size=2048)
    router = Router(cfg)
    g = torch.Generator().manual_seed(tokens + 10 * n_group)
    router.weight.data = torch.randn(64, 2048, generator=g) / 2048 ** 0.5
    router.e_score_correction_bias.data = torch.randn(64, generator=g) * 0.1
    x = torch.randn(tokens, 2048, generator=g).bfloat16()
    with patch.object(Router, "_native", autospec=True, side_effect=Router._native) as spy:
        ids, weights = router(x)
        router(torch.cat([x] * (NATIVE_ROUTER_TOKENS + 1))[: NATIVE_ROUTER_TOKENS + 1])
    assert spy.call_count == 1
    with patch.object(build, "load", lambda: None):
        want_ids, want_weights = router(x)
    assert torch.equal(ids, want_ids)
    assert torch.allclose(weights, want_weights, rtol=1e-5, atol=0)
