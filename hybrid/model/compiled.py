"""Kernels that torch's compiler (Inductor) builds for a CPU decode step: one token's work there
is a pass over a weight or over a short context, and as one generated loop it runs at close to the
memory's speed, where a chain of torch ops pays a thread wake-up and an intermediate per op.

Built on first use, once per process. Inductor's cache of whole compiled graphs on disk is off
for them: in a later process it handed back graphs built for other input layouts (wrong logits,
once a double free); its cache of built C++ code, keyed by the code itself, stays on. They need a
C++ compiler: where none works, `available()` is False and callers keep torch's ops."""

from __future__ import annotations

import functools
import logging

import torch

from hybrid.model.norm import rms_norm
from hybrid.model.rope import apply_rope

log = logging.getLogger(__name__)
# Each kernel is built per dtype, per size-1 dimension (one sequence, one key) and per inference
# mode; past the limit torch would run the remaining cases eagerly, correct but slow.
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


@torch.compile(**COMPILE)
def _mla_inputs(x, w_qa, qa_norm, w_qb, w_kva, kva_norm, cos, sin, eps: float, heads: int, nope: int, rank: int):
    q = _dot(w_qb, rms_norm(_dot(w_qa, x), qa_norm, eps)).view(heads, -1)
    kv = _dot(w_kva, x)
    return (q[:, :nope], apply_rope(q[None, :, nope:], cos, sin)[0], rms_norm(kv[:rank], kva_norm, eps),
            apply_rope(kv[None, rank:], cos, sin)[0])


def mla_inputs(x: torch.Tensor, w_qa: torch.Tensor, qa_norm: torch.Tensor, w_qb: torch.Tensor, w_kva: torch.Tensor,
               kva_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float, heads: int, nope: int,
               rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What MLA computes from one token x [hidden] before it attends, as one kernel: the query's
    low-rank projection, its norm and its expansion to the heads, the latent and rope key, rope
    applied to both (cos, sin [1, rope / 2]). Returns q_nope [heads, nope], q_pe [heads, rope],
    latent [rank] (normalised) and k_rope [rope]."""
    with torch.no_grad():
        return _mla_inputs(x, w_qa, qa_norm, w_qb, w_kva, kva_norm, cos, sin, eps, heads, nope, rank)


@torch.compile(**COMPILE)
def _absorbed_attention(w_uk, w_uv, q_nope, q_pe, latent, k_rope, mask, scale: float):
    q = (w_uk.float()[None] * q_nope.float()[..., None]).sum(2)  # [S, heads, rank]
    scores = ((q[:, :, None] * latent.float()[:, None]).sum(-1)
              + (q_pe.float()[:, :, None] * k_rope.float()[:, None]).sum(-1)) * scale
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)  # [S, heads, C]
    out = (probs[..., None] * latent.float()[:, None]).sum(2)  # [S, heads, rank]
    return (w_uv.float()[None] * out[:, :, None]).sum(-1).to(q_nope.dtype)


def absorbed_attention(w_uk: torch.Tensor, w_uv: torch.Tensor, q_nope: torch.Tensor, q_pe: torch.Tensor,
                       latent: torch.Tensor, k_rope: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """MLA decode with kv_b folded in, one loop nest from the queries to the heads' values: S
    sequences' one-token queries q_nope [S, heads, nope] and q_pe [S, heads, rope] against their
    contexts latent [S, C, rank] and k_rope [S, C, rope] where mask [S, C] is True (each row has a
    key), w_uk [heads, nope, rank] and w_uv [heads, v, rank]. Returns [S, heads, v]; scores,
    softmax and values in fp32."""
    with torch.no_grad():
        return _absorbed_attention(w_uk, w_uv, q_nope, q_pe, latent, k_rope, mask, scale)


@functools.cache
def available() -> bool:
    """Whether Inductor builds and runs kernels here: the GEMV built and checked once."""
    try:
        w = torch.arange(12, dtype=torch.bfloat16, device="cpu").view(3, 4)
        return torch.equal(gemv(w, torch.ones(4, dtype=torch.bfloat16, device="cpu")), w.float().sum(-1).bfloat16())
    except Exception as e:  # no compiler, or one Inductor cannot use: torch's ops still run
        log.warning("torch's compiler builds no CPU kernels here (%s: %s); using torch's ops", type(e).__name__, e)
        return False
