"""Portable routed experts in plain torch: correct on any CPU, no Python loop over tokens.

Weights stay as the checkpoint stores them (INT4 stays packed) and each touched expert is
dequantized when it runs, so host memory holds the experts once. This is the reference and the
fallback; the kt-kernel backend is the fast path. Work runs on one helper thread (torch releases
the GIL), so `submit` returns at once and overlaps the caller's work.

`PackedInt4Experts` is the same on the CPU for INT4 weights, through torch's CPU int4 matmul
kernel: the 4-bit values and scales are reordered once into its layout (nothing re-quantized),
which makes decode ~100x faster than dequantizing the touched experts in every pass.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F

from hybrid.experts.weights import ExpertWeights
from hybrid.quant import dequantize_int4, unpack_int4


# Above this many values in a call's gathered rows, the experts' rows and outputs are handled one
# expert at a time: a 2,048-token prompt of `mini` gathered 67 MB and added 134 MB at once, and its
# GEMM experts took 1.5x as long; a few tokens' (decode) are gathered at once, with fewer ops (on
# a GPU, fewer kernel launches).
BATCHED_VALUES = 1 << 20


class TorchExperts:
    name = "torch"

    def __init__(self, weights: ExpertWeights, dtype: torch.dtype = torch.float32):
        self.weights = weights
        self.dtype = dtype
        self.method = "int4_kgroup" if weights.format == "int4" else "bf16"
        self.kernel = f"torch dequantize + {str(dtype)[6:]} matmul"
        self._pool: ThreadPoolExecutor | None = None  # made on first submit; forward() alone needs none
        self._pending: Future | None = None

    def submit(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        assert self._pending is None, "wait() before the next submit()"
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-experts")
        self._pending = self._pool.submit(self.forward, hidden, topk_ids, topk_weights)

    def wait(self) -> torch.Tensor:
        pending, self._pending = self._pending, None
        return pending.result()

    def nbytes(self) -> int:
        """Host memory this backend holds."""
        return self.weights.nbytes()

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e's gate, up, down as `dtype` matrices."""
        w = self.weights
        if w.format == "float":
            return w.gate[e].to(self.dtype), w.up[e].to(self.dtype), w.down[e].to(self.dtype)
        return tuple(dequantize_int4(p[e], s[e], w.group_size, self.dtype) for p, s in
                     ((w.gate, w.gate_scale), (w.up, w.up_scale), (w.down, w.down_scale)))

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Group the (token, slot) pairs by expert, run each touched expert once on its tokens and add
        their weighted outputs in fp32. Slots whose id is -1 belong to another backend and are skipped."""
        x = hidden.to(self.dtype)
        k = topk_ids.shape[1]
        ids, order = topk_ids.reshape(-1).sort(stable=True)
        experts, counts = (t.tolist() for t in torch.unique_consecutive(ids, return_counts=True))
        if experts and experts[0] < 0:  # -1 slots sort first: drop them
            order, experts, counts = order[counts[0]:], experts[1:], counts[1:]
        tokens, weights = order // k, topk_weights.reshape(-1)[order].to(torch.float32)[:, None]
        spans = list(zip(experts, itertools.accumulate(counts, initial=0), itertools.accumulate(counts)))
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if len(tokens) * x.shape[1] > BATCHED_VALUES:  # a prompt's: one expert at a time, in the caches
            for e, s, t in spans:  # weighted into fp32 in one pass, whatever the product's layout
                y = torch.mul(self.mlp(e, x[tokens[s:t]]), weights[s:t],
                              out=torch.empty(t - s, x.shape[1], dtype=torch.float32, device=x.device))
                out.index_add_(0, tokens[s:t], y)
        elif spans:  # a few tokens': the rows gathered and the outputs added at once, fewer ops
            xs = x[tokens]
            out.index_add_(0, tokens, torch.cat([self.mlp(e, xs[s:t]) for e, s, t in spans]).float() * weights)
        return out.to(hidden.dtype)

    def mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x [n, H] (`dtype`): down(silu(gate x) * up x)."""
        gate, up, down = self.expert(e)
        return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


class PackedInt4Experts(TorchExperts):
    """INT4 experts on the CPU in the layout of `torch.ops.aten._weight_int4pack_mm_for_cpu`, in
    bf16 (its only fast activation type): per expert, gate and up stacked into one [2I, H/2]
    uint8 matrix, down [H, I/2], each with (scale, zero = 0) pairs [in/group, out, 2]. Only the
    packed copy is kept."""

    def __init__(self, weights: ExpertWeights):
        assert self.fits(weights), "INT4 weights on the CPU in sizes the kernel takes"
        super().__init__(weights, torch.bfloat16)
        self.weights = None  # only the packed copy is kept
        self.kernel = f"torch int4pack_mm ({torch.backends.cpu.get_cpu_capability()})"
        w, self.group, self.size = weights, weights.group_size, weights.intermediate_size
        self.packed = [(_pack(torch.cat((w.gate[e], w.up[e])), torch.cat((w.gate_scale[e], w.up_scale[e]))),
                        _pack(w.down[e], w.down_scale[e])) for e in range(w.num_experts)]

    @staticmethod
    def fits(weights: ExpertWeights) -> bool:
        g, h, i = weights.group_size, weights.hidden_size, weights.intermediate_size
        return (weights.format == "int4" and weights.gate.device.type == "cpu" and g in (32, 64, 128, 256)
                and h % 64 == 0 and h % g == 0 and i % 32 == 0 and i % g == 0)

    def nbytes(self) -> int:
        return sum(t.nbytes for pair in self.packed for op in pair for t in op)

    def mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        (gate_up, gate_up_sz), (down, down_sz) = self.packed[e]
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        gate, up = mm(x, gate_up, self.group, gate_up_sz).split(self.size, 1)
        return mm(F.silu(gate) * up, down, self.group, down_sz)


def _pack(packed: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 [N, K/8] (stored values 0..15, low nibble first) + scale [N, K/group] -> the CPU int4
    kernel's operands. torch lays the weight out per CPU capability (AVX-512, AVX2 and the default
    path differ), so its own converter builds it, in the process that will run it."""
    values = unpack_int4(packed).to(torch.int32) + 8  # [N, K], as stored
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    s = scale.T.to(torch.bfloat16)
    return weight, torch.stack((s, torch.zeros_like(s)), -1).contiguous()
