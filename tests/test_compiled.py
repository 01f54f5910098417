"""The GEMV torch's compiler builds for a CPU decode step (hybrid/model/compiled.py): the math of
torch's matmul, and one build for every shape the model has."""

import pytest
import torch.nn.functional as F

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
