"""Routed experts on kt-kernel's CPU MoE kernels (its low-level API: `CPUInfer`, `MOEConfig`,
`*_MOE`), using every core this process has without oversubscribing one: kt's compute threads on
all but one (`pool.py`), its share of the rows on the caller's core (`row_split.py`).

- A `forward_task` with more tokens than `max_len` crashes the process: batches are split here.
- kt's K-group INT4 class copies the weights into its own buffers at load (with FP32 scales), so
  the checkpoint's tensors are not needed afterwards; its AVX2 INT4 class reads them in place.
- Float experts quantized at load are cached on disk (`cache.py`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from hybrid.experts import cpu
from hybrid.experts.kt.cache import DEFAULT_CACHE, cache_entry
from hybrid.experts.kt.kernels import ALIGN, IN_PLACE, MIN_EXPERTS, QUANTIZED, Unsupported, resolve
from hybrid.experts.kt.pool import pool
from hybrid.experts.kt.quiet import quiet
from hybrid.experts.kt.row_split import share_rows, slice_rows
from hybrid.experts.torch_backend import PackedInt4Experts, TorchExperts
from hybrid.experts.weights import ExpertWeights
from placement.model_spec import expert_bytes_held


class KTExperts:
    """One MoE layer's routed experts on kt-kernel, with a share computed on the caller's core."""

    name = "kt"

    def __init__(self, weights: ExpertWeights, layer: int, method: str = "auto", threads: int | None = None,
                 cache_dir: Path | None = None, top_k: int = 8, max_len: int = 512):
        from kt_kernel import kt_kernel_ext

        assert max_len % 64 == 0, "kt's tiles need max_len divisible by 64"
        self.method, self.kt_class = resolve(method, weights.format)
        cores = cpu.expert_cores(threads)
        self.threads, self.pool = len(cores), pool(cores)
        size, unit = weights.intermediate_size, ALIGN.get(self.kt_class, 64) * self.pool.subpools
        if weights.hidden_size % unit or size % unit:
            raise Unsupported(f"{self.kt_class} takes hidden and intermediate sizes divisible by {unit} (it crashes on "
                              f"others); these experts are {weights.hidden_size} x {size}")
        if weights.num_experts < MIN_EXPERTS.get(self.kt_class, 1):
            raise Unsupported(f"{self.kt_class} crashes on layers of fewer than {MIN_EXPERTS[self.kt_class]} experts; "
                              f"this one has {weights.num_experts}")
        self.hidden_size, self.top_k, self.max_len = weights.hidden_size, top_k, max_len
        share = share_rows(size, unit, self.kt_class, self.pool.threads) if self.pool.caller_core is not None else 0
        self.rows, self.share = size - share, None
        if share:
            part = slice_rows(weights, self.rows, size)
            self.share = PackedInt4Experts(part) if PackedInt4Experts.fits(part) else TorchExperts(part, torch.bfloat16)
        self.kernel = f"kt-kernel {cpu.kt().variant} {self.kt_class}" + (
            f" with {self.share.kernel} on the caller's core" if self.share is not None else "")
        self._copied = weights.num_experts * expert_bytes_held(self.method, self.hidden_size, self.rows,
                                                               weights.group_size)
        self._mask = torch.zeros(weights.num_experts, dtype=torch.bool)  # experts kt skips: none
        self._order = torch.arange(weights.num_experts, dtype=torch.int64)  # kt's expert order: ours
        cfg = kt_kernel_ext.moe.MOEConfig(weights.num_experts, top_k, self.hidden_size, self.rows,
                                          self._mask.data_ptr())
        cfg.layer_idx, cfg.pool, cfg.max_len = layer, self.pool.cpu.backend_, max_len
        with self._source(cfg, weights, layer, Path(cache_dir or DEFAULT_CACHE)), quiet():
            self.moe = getattr(kt_kernel_ext.moe, self.kt_class)(cfg)
            self.pool.cpu.submit(self.moe.load_weights_task(self._order.data_ptr()))
            self.pool.cpu.sync()
        self._pending = None

    @contextlib.contextmanager
    def _source(self, cfg, weights: ExpertWeights, layer: int, cache_dir: Path):
        """Point kt at its rows of the weights, or at its cached quantized copy of them, for the
        load in the block; keep what kt reads after it."""
        self._keep: list[torch.Tensor] = []
        entry = None
        if self.method in QUANTIZED:
            entry = cache_entry(cache_dir, layer, self.kt_class, weights, self.rows, self.pool.subpools)
            if entry.valid():
                cfg.load, cfg.path = True, str(entry.folder)
                yield
                return
        w = slice_rows(weights, 0, self.rows)
        if w.format == "int4":
            for name, packed, scale in (("gate", w.gate, w.gate_scale), ("up", w.up, w.up_scale),
                                        ("down", w.down, w.down_scale)):
                setattr(cfg, f"{name}_proj", packed.data_ptr())
                setattr(cfg, f"{name}_scale", scale.data_ptr())
                setattr(cfg, f"{name}_projs", [[packed[e].data_ptr() for e in range(w.num_experts)]])
                setattr(cfg, f"{name}_scales", [[scale[e].data_ptr() for e in range(w.num_experts)]])
            cfg.quant_config.bits, cfg.quant_config.group_size, cfg.quant_config.zero_point = 4, w.group_size, False
            tensors = w.tensors()
        else:
            tensors = [t.to(torch.bfloat16).contiguous() for t in (w.gate, w.up, w.down)]
            cfg.gate_proj, cfg.up_proj, cfg.down_proj = (t.data_ptr() for t in tensors)
        if self.kt_class in IN_PLACE:
            self._keep = tensors
        if entry is None:
            yield
            return
        with entry.writing() as folder:
            cfg.save, cfg.path = True, str(folder)
            yield

    def nbytes(self) -> int:
        """Host memory this backend holds: kt's copy of its rows and the caller's share."""
        kt = sum(t.nbytes for t in self._keep) if self.kt_class in IN_PLACE else self._copied
        return kt + (self.share.nbytes() if self.share is not None else 0)

    def submit(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        assert self._pending is None, "wait() before the next submit()"
        tokens, k = topk_ids.shape
        if k > self.top_k:
            raise ValueError(f"{k} experts per token; this layer was built for at most {self.top_k}")
        x = hidden.to(torch.bfloat16).contiguous()
        ids = topk_ids.to(torch.int64).contiguous()
        w = topk_weights.to(torch.float32).contiguous()
        out = torch.empty(tokens, self.hidden_size, dtype=torch.bfloat16)
        counts = []
        for s in range(0, tokens, self.max_len):
            n = torch.tensor([min(self.max_len, tokens - s)], dtype=torch.int32)
            counts.append(n)
            self.pool.cpu.submit(self.moe.forward_task(n.data_ptr(), k, ids[s].data_ptr(), w[s].data_ptr(),
                                                       x[s].data_ptr(), out[s].data_ptr(), False))
        if counts:
            self.pool.hand_over()
        self._pending = (hidden.dtype, x, ids, w, out, counts)

    def wait(self) -> torch.Tensor:
        dtype, x, ids, w, out, _ = self._pending
        self._pending = None
        part = self._on_caller_core(x, ids, w) if self.share is not None and len(x) else None
        self.pool.cpu.sync()
        if part is not None:
            out += part
        return out.to(dtype)

    def _on_caller_core(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """The caller's share, on one thread on the core the pool left to it."""
        mask, threads = os.sched_getaffinity(0), torch.get_num_threads()
        os.sched_setaffinity(0, {self.pool.caller_core})
        torch.set_num_threads(1)
        try:
            return self.share.forward(x, ids, w)
        finally:
            torch.set_num_threads(threads)
            os.sched_setaffinity(0, mask)
