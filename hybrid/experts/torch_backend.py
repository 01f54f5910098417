"""Portable routed experts in plain torch: correct on any CPU, no Python loop over tokens.

Weights stay as the checkpoint stores them (INT4 stays packed) and each touched expert is
dequantized when it runs, so host memory holds the experts once. This is the reference and the
fallback; the kt-kernel backend is the fast path. Work runs on one helper thread (torch releases
the GIL), so `submit` returns at once and overlaps the caller's work.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F

from hybrid.experts.weights import ExpertWeights
from hybrid.model.quant import dequantize_int4


class TorchExperts:
    name = "torch"

    def __init__(self, weights: ExpertWeights, dtype: torch.dtype = torch.float32):
        self.weights = weights
        self.dtype = dtype
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

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Expert e's gate, up, down as `dtype` matrices."""
        w = self.weights
        if w.format == "float":
            return w.gate[e].to(self.dtype), w.up[e].to(self.dtype), w.down[e].to(self.dtype)
        return tuple(dequantize_int4(p[e], s[e], w.group_size, self.dtype) for p, s in
                     ((w.gate, w.gate_scale), (w.up, w.up_scale), (w.down, w.down_scale)))

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Group the (token, slot) pairs by expert, run each touched expert once on its tokens.
        Slots whose id is -1 belong to another backend and are skipped."""
        x = hidden.to(self.dtype)
        k = topk_ids.shape[1]
        flat = topk_ids.reshape(-1)
        order = flat.argsort(stable=True)[int((flat < 0).sum()):]  # -1 slots sort first: drop them
        counts = torch.bincount(flat[order], minlength=self.weights.num_experts).tolist()
        token_of = order // k
        w = topk_weights.reshape(-1)[order].to(self.dtype).unsqueeze(1)
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = token_of[start:start + n]
            gate, up, down = self.expert(e)
            xe = x[rows]
            h = F.silu(xe @ gate.T) * (xe @ up.T)
            out.index_add_(0, rows, (h @ down.T) * w[start:start + n])
            start += n
        return out.to(hidden.dtype)
