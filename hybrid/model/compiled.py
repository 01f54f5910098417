"""The GEMV torch's compiler (Inductor) builds for a CPU decode step, one of the dense kernels
`dense_kernel.py` chooses from: one token's work there is a pass over a weight, and as one
generated loop it runs at close to the memory's speed.

Built on first use, once per process. Inductor's cache of whole compiled graphs on disk is off
for it: in a later process it handed back graphs built for other input layouts (wrong logits,
once a double free); its cache of built C++ code, keyed by the code itself, stays on. It needs a
C++ compiler: where none works, `available()` is False and callers keep torch's ops."""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)
# The kernel is built per dtype, per size-1 dimension and per inference mode; past the limit
# torch would run the remaining cases eagerly, correct but slow.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)


def _dot(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (weight.float() * x.float()).sum(-1).to(x.dtype)


COMPILE = {"dynamic": True, "options": {"fx_graph_cache": False}}
_gemv = torch.compile(_dot, **COMPILE)


def gemv(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """weight [out, in] @ x [in], accumulated in fp32: one pass over the weight. Always without
    autograd: Inductor builds a kernel per grad mode (and per reduction up to 4,096 long and beyond)."""
    with torch.no_grad():
        return _gemv(weight, x)


@functools.cache
def available() -> bool:
    """Whether Inductor builds and runs kernels here: the GEMV built and checked once."""
    try:
        w = torch.arange(12, dtype=torch.bfloat16, device="cpu").view(3, 4)
        return torch.equal(gemv(w, torch.ones(4, dtype=torch.bfloat16, device="cpu")), w.float().sum(-1).bfloat16())
    except Exception as e:  # no compiler, or one Inductor cannot use: torch's ops still run
        log.warning("torch's compiler builds no CPU kernels here (%s: %s); using torch's ops", type(e).__name__, e)
        return False
