"""The kernels torch's compiler builds for a CPU decode step (hybrid/model/compiled.py): the math
of the torch ops they replace, and one build for every shape the model has."""

import pytest
import torch
import torch.nn.functional as F

from hybrid.api import load_model
from hybrid.model import compiled
from hybrid.model.dense_kernel import CompiledLinear

pytestmark = pytest.mark.skipif(not compiled.available(),
                                reason="torch's compiler builds no kernels here (no C++ compiler)")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_the_gemv_builds_one_kernel_for_every_shape_and_mode():
    """Weights of any shape, with and without autograd or inference mode, share the kernels built
    (one per reduction up to 4,096 long and beyond): the compiler's cache never runs out and falls
    back to eager math, which would copy each weight to fp32 (3-5x slower)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(1)
    for i, (rows, cols) in enumerate([(768, 2048), (3072, 768), (576, 2048), (5632, 2048), (2048, 5632), (7, 9)]):
        layer = CompiledLinear(torch.randn(rows, cols, generator=g).bfloat16())
        x = torch.randn(1, cols, generator=g).bfloat16()
        with torch.inference_mode() if i % 2 else torch.enable_grad():
            assert rel(layer(x), F.linear(x.float(), layer.weight.float())) < 5e-3
    builds = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert 1 <= builds <= 4, f"{builds} kernels built for 6 shapes"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mla_inputs_are_what_mlas_torch_ops_compute(tiny_dir, dtype):
    """One token's queries, latent and rope key through `compiled.mla_inputs` (projections, norms
    and rope in one kernel) against MLA's torch ops on the same weights, at several positions."""
    model = load_model(tiny_dir, dtype=dtype, dense="torch")
    mla, rope = model.decoder.model.layers[1].self_attn, model.decoder.rope
    g = torch.Generator().manual_seed(2)
    for pos in (0, 7, 300):
        x = torch.randn(1, model.config.hidden_size, generator=g).to(dtype)
        cos, sin = rope.cos_sin(torch.tensor([pos]))
        want = mla._inputs(x, cos, sin)  # torch's ops: the projections are nn.Linear here
        got = compiled.mla_inputs(x[0], mla.q_a_proj.weight, mla.q_a_layernorm.weight, mla.q_b_proj.weight,
                                  mla.kv_a_proj_with_mqa.weight, mla.kv_a_layernorm.weight, cos, sin,
                                  mla.q_a_layernorm.eps, mla.n_heads, mla.nope, mla.rank)
        for a, b in zip(got, want):
            assert a[None].shape == b.shape and a.dtype == b.dtype
            assert rel(a[None], b) < (1e-5 if dtype == torch.float32 else 1e-2), pos


def test_one_token_of_a_model_on_the_compiled_gemv_takes_the_compiled_inputs(tiny_dir):
    from unittest.mock import patch

    model = load_model(tiny_dir, dense="compiled")
    ids = torch.randint(0, model.config.vocab_size, (6,), generator=torch.Generator().manual_seed(3))
    with patch.object(compiled, "mla_inputs", side_effect=compiled.mla_inputs) as spy:
        model.logits(ids, kv_dtype="bf16", decode=True)
    assert spy.call_count == len(ids) * model.config.num_hidden_layers
