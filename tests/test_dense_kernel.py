"""Dense projections on oneDNN: the same numbers as torch's bf16 matmul, on every module it takes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybrid.api import load_model
from hybrid.model import dense_kernel
from hybrid.model.dense_kernel import OneDNNLinear

onednn = pytest.mark.skipif("onednn" not in dense_kernel.supported(),
                            reason="oneDNN's bf16 path needs AVX512-BF16 or AMX; this CPU runs torch's")


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@onednn
@pytest.mark.parametrize("shape", [(1, 300), (7, 300), (513, 300), (2, 5, 300)])
def test_onednn_linear_matches_torch(shape):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(700, 300, generator=g) / 300**0.5).bfloat16()
    x = torch.randn(*shape, generator=g).bfloat16()
    got, want = OneDNNLinear(w)(x), F.linear(x.float(), w.float())
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert rel(got, want) < 5e-3  # bf16 output rounding; a wrong layout is off by ~1


@onednn
def test_pack_takes_every_cpu_bf16_linear_and_nothing_else():
    model = nn.Sequential(nn.Linear(64, 32, bias=False).bfloat16(), nn.Linear(32, 16, bias=False),
                          nn.Linear(16, 8).bfloat16())
    x = torch.randn(3, 64).bfloat16()
    assert dense_kernel.pack(model, "onednn") == "onednn"
    assert [type(m).__name__ for m in model] == ["OneDNNLinear", "Linear", "Linear"]  # fp32 and biased stay
    assert model[0](x).shape == (3, 32)


def test_pack_refuses_a_kernel_this_cpu_lacks(monkeypatch):
    monkeypatch.setattr(dense_kernel, "supported", lambda: ("torch",))
    with pytest.raises(ValueError, match="does not run on this CPU"):
        dense_kernel.pack(nn.Linear(4, 4, bias=False), "onednn")
    assert dense_kernel.pack(nn.Linear(4, 4, bias=False), "torch") == "torch"


def test_fastest_is_one_that_runs_here():
    assert dense_kernel.fastest() in dense_kernel.supported()


@onednn
def test_model_on_onednn_agrees_with_the_plain_bf16_path(tiny_dir):
    """The documented tolerance: same routing and top token at (nearly) every position, logits
    within bf16 rounding of each other."""
    ids = torch.randint(0, 1280, (64,), generator=torch.Generator().manual_seed(3))
    plain = load_model(tiny_dir, dense="torch")
    fast = load_model(tiny_dir, dense="onednn")
    assert (plain.dense_kernel, fast.dense_kernel) == ("torch", "onednn")
    assert isinstance(fast.decoder.lm_head, OneDNNLinear) and isinstance(plain.decoder.lm_head, nn.Linear)
    a, b = plain.logits(ids), fast.logits(ids)
    assert rel(b, a) <= 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95
    assert plain.generate(ids, 16) == fast.generate(ids, 16)
