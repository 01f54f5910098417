"""Dense projections on oneDNN and on the compiled GEMV: the same numbers as torch's bf16 matmul,
on every module they take."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybrid.api import load_model
from hybrid.model import dense_kernel
from hybrid.model.dense_kernel import PACKED

REASONS = {"onednn": "oneDNN's bf16 path needs AVX512-BF16 or AMX; this CPU runs torch's",
           "compiled": "the compiled GEMV needs a C++ compiler Inductor can use"}
packed_kernels = pytest.mark.parametrize("kernel", [
    pytest.param(k, marks=pytest.mark.skipif(k not in dense_kernel.supported(), reason=REASONS[k])) for k in PACKED])


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@packed_kernels
@pytest.mark.parametrize("shape", [(1, 300), (1, 1, 300), (7, 300), (513, 300), (2, 5, 300), (1, 5000)])
def test_packed_linear_matches_torch(kernel, shape):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(700, shape[-1], generator=g) / shape[-1]**0.5).bfloat16()
    x = torch.randn(*shape, generator=g).bfloat16()
    got, want = PACKED[kernel](w)(x), F.linear(x.float(), w.float())
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert rel(got, want) < 5e-3  # bf16 output rounding; a wrong layout is off by ~1


@packed_kernels
def test_pack_takes_every_cpu_bf16_linear_and_nothing_else(kernel):
    model = nn.Sequential(nn.Linear(64, 32, bias=False).bfloat16(), nn.Linear(32, 16, bias=False),
                          nn.Linear(16, 8).bfloat16())
    x = torch.randn(3, 64).bfloat16()
    assert dense_kernel.pack(model, kernel) == kernel
    assert [type(m) for m in model] == [PACKED[kernel], nn.Linear, nn.Linear]  # fp32 and biased stay
    assert model[0](x).shape == (3, 32)


def test_pack_refuses_a_kernel_this_cpu_lacks(monkeypatch):
    monkeypatch.setattr(dense_kernel, "supported", lambda: ("torch",))
    with pytest.raises(ValueError, match="does not run on this CPU"):
        dense_kernel.pack(nn.Linear(4, 4, bias=False), "onednn")
    assert dense_kernel.pack(nn.Linear(4, 4, bias=False), "torch") == "torch"


def test_fastest_is_one_that_runs_here():
    assert dense_kernel.fastest() in dense_kernel.supported()


@packed_kernels
def test_model_on_a_packed_kernel_agrees_with_the_plain_bf16_path(tiny_dir, kernel):
    """The documented tolerance: same routing and top token at (nearly) every position, logits
    within bf16 rounding of each other, over a prefill and over decode steps. (A bf16 near-tie in
    the router sends a token to another expert now and then: those positions differ more, and
    greedy generations can part there.)"""
    ids = torch.randint(0, 1280, (64,), generator=torch.Generator().manual_seed(3))
    plain = load_model(tiny_dir, dense="torch")
    fast = load_model(tiny_dir, dense=kernel)
    assert (plain.dense_kernel, fast.dense_kernel) == ("torch", kernel)
    assert isinstance(fast.decoder.lm_head, PACKED[kernel]) and isinstance(plain.decoder.lm_head, nn.Linear)
    a, b = plain.logits(ids), fast.logits(ids)
    assert rel(b, a) <= 0.05
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.95
    # decode's path (one token a step: the GEMV's) over the same tokens, under the same tolerance
    a, b = plain.logits(ids, kv_dtype="bf16", decode=True), fast.logits(ids, kv_dtype="bf16", decode=True)
    each = (b - a).norm(dim=-1) / a.norm(dim=-1)
    assert each.median() <= 0.03 and (each <= 0.05).float().mean() >= 0.9, each
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
