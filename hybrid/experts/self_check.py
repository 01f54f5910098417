"""Every expert kernel proves itself on this CPU before it serves.

The kernels differ by CPU (kt-kernel's avx2 / avx512 / amx builds, torch's int4 layout per CPU
capability), and a kernel fed wrongly computes plausible garbage rather than failing. So the
first time a kernel meets a layer shape, a few tokens go through one of its experts and are
compared with the float32 reference computed from the same stored weights (the plain torch
backend, which dequantizes). The verdict is kept per kernel and shape: one check per model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from hybrid.experts.torch_backend import TorchExperts
from hybrid.experts.weights import ExpertWeights

# Relative L2 error allowed per method: bf16 activations on INT4 / bf16 weights stay near 1e-2;
# kt's load-time quantization adds its own (per-row INT8 ~0.03, per-row INT4 ~0.3 on random
# weights). A wrong kernel is off by ~1.
TOLERANCE = {"int4_kgroup": 0.04, "bf16": 0.04, "amx_int8": 0.1, "amx_int4": 0.45}
TOKENS = 4


@dataclass(frozen=True)
class Verdict:
    kernel: str
    error: float
    tolerance: float
    seconds: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # False for NaN too

    def __str__(self) -> str:
        return (f"{self.kernel}: relative error {self.error:.2g} against the float32 reference "
                f"({'within' if self.ok else 'beyond'} its tolerance {self.tolerance:g})")


VERDICTS: dict[tuple, Verdict] = {}


def check(backend, weights: ExpertWeights) -> Verdict:
    """The backend's verdict on these weights' shape, computed once."""
    key = (backend.kernel, weights.format, weights.hidden_size, weights.intermediate_size, weights.group_size)
    if key not in VERDICTS:
        VERDICTS[key] = _measure(backend, weights)
    return VERDICTS[key]


@torch.inference_mode()
def _measure(backend, weights: ExpertWeights) -> Verdict:
    """A few tokens through the last expert (a wrong stride or offset shows there first), and as many
    as take the backend's prompt path where it has one (`gemm_min_tokens`); the worse error."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    e = weights.num_experts - 1
    one = weights.map(lambda t: t[e:e + 1])
    errors = []
    for tokens in {TOKENS, getattr(backend, "gemm_min_tokens", None) or TOKENS}:
        x = torch.randn(tokens, weights.hidden_size, generator=g).to(torch.bfloat16)
        w = torch.rand(tokens, 1, generator=g) + 0.5
        backend.submit(x, torch.full((tokens, 1), e, dtype=torch.int64), w)
        out = backend.wait().float()
        ref = TorchExperts(one, torch.float32).forward(x.float(), torch.zeros(tokens, 1, dtype=torch.int64), w)
        errors.append(float((out - ref).norm() / ref.norm().clamp(min=1e-30)))
    error = max(errors, key=lambda v: math.inf if math.isnan(v) else v)  # a NaN is the worst
    return Verdict(backend.kernel, error, TOLERANCE[backend.method], time.perf_counter() - start)
