"""Routed INT4 experts on our own kernel (hybrid/native/int4_moe.cpp): the checkpoint's 4-bit values and
scales as stored (the values' bytes reordered once at load for the kernel's lanes), the
activations quantized to int8 in blocks of 32, the products integer dot products on torch's
threads. One call per layer, whatever the tokens: each chosen expert's rows are read once per
step, so a batch of streams reads the union of its experts once."""

from __future__ import annotations

import torch

from hybrid.experts.weights import ExpertWeights
from hybrid.native import build
from placement.cpu_probe import has
from placement.model_spec import int4_dot_fits

# Tokens per call of the kernel: its scratch holds each (token, expert) pair's activations and
# output (at Kimi's sizes ~35 KB a pair), and past a few hundred tokens a call's weights are read
# once for many tokens anyway.
CHUNK = 1024
# the kernel's instruction sets, strongest first: name, the code the kernel takes, CPU flags
ISAS = (("avx512_vnni", 2, ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")), ("avx2", 1, ("avx2", "fma")))


def runnable() -> list[str]:
    """The kernel's instruction sets that this CPU executes, strongest first."""
    return [name for name, _, flags in ISAS if has(*flags)]


def why_not() -> str | None:
    """Why the kernel cannot run here, or None when it can."""
    return "this CPU lacks AVX2, the least the INT4 dot kernel needs" if not runnable() else build.why_not()


class DotExperts:
    name = "dot"
    method = "int4_kgroup"

    def __init__(self, weights: ExpertWeights, isa: str | None = None):
        """`isa`: one of `runnable()` (default: the strongest)."""
        assert self.fits(weights), "INT4 weights on the CPU in sizes the kernel takes"
        self.isa = isa or runnable()[0]
        self.code = next(c for name, c, _ in ISAS if name == self.isa)
        self.lib = build.load()
        assert self.lib is not None, why_not()
        self.shape = (weights.num_experts, weights.hidden_size, weights.intermediate_size, weights.group_size)
        self.values = tuple(self._repack(t) for t in (weights.gate, weights.up, weights.down))
        self.scales = tuple(t.to(torch.bfloat16).contiguous() for t in
                            (weights.gate_scale, weights.up_scale, weights.down_scale))
        self.kernel = f"hybrid INT4 x int8 dot ({self.isa})"
        self._pending = None

    @staticmethod
    def fits(weights: ExpertWeights) -> bool:
        return (weights.format == "int4" and weights.gate.device.type == "cpu"
                and int4_dot_fits(weights.hidden_size, weights.intermediate_size, weights.group_size))

    def _repack(self, packed: torch.Tensor) -> torch.Tensor:
        """int32 [E, out, in / 8] as stored -> uint8 [E, out, in / 2] in the kernel's order."""
        src = packed.contiguous().view(torch.uint8)
        dst = torch.empty_like(src)
        rows, k = src.numel() // src.shape[-1], 2 * src.shape[-1]
        if self.lib.hybrid_int4_repack(self.code, rows, k, src.data_ptr(), dst.data_ptr()):
            raise RuntimeError(f"the INT4 dot kernel has no {self.isa} code in this build")
        return dst

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.values, *self.scales))

    def submit(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """Keeps the inputs; the work runs in `wait`, on the caller's thread and torch's (a GPU's
        work queued in between still overlaps it)."""
        assert self._pending is None, "wait() before the next submit()"
        self._pending = (hidden, topk_ids, topk_weights)

    def wait(self) -> torch.Tensor:
        hidden, ids, w = self._pending
        self._pending = None
        return self.forward(hidden, ids, w)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Sum over k of topk_weights[t, k] * expert[topk_ids[t, k]](hidden[t]); a slot whose id is
        negative belongs to another backend and is skipped."""
        experts, hidden_size, intermediate, group = self.shape
        x = hidden.to(torch.float32).contiguous()
        ids = topk_ids.to(torch.int64).contiguous()
        w = topk_weights.to(torch.float32).contiguous()
        out = torch.empty(x.shape[0], hidden_size, dtype=torch.float32)
        for s in range(0, x.shape[0], CHUNK):
            rc = self.lib.hybrid_int4_moe(self.code, min(CHUNK, x.shape[0] - s), hidden_size, intermediate, group,
                                          experts, ids.shape[1], x[s].data_ptr(), ids[s].data_ptr(), w[s].data_ptr(),
                                          *(t.data_ptr() for t in (*self.values, *self.scales)), out[s].data_ptr())
            if rc:
                raise RuntimeError(f"the INT4 dot kernel has no {self.isa} code in this build")
        return out.to(hidden.dtype)
