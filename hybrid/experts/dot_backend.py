"""Routed INT4 experts on our own kernel (hybrid/native/int4_moe.cpp): the checkpoint's 4-bit values and
scales as stored (the values' bytes reordered once at load for the kernel's lanes), the
activations quantized to int8 in blocks of 32, the products integer dot products on torch's
threads. One call per layer, whatever the tokens: each chosen expert's rows are read once per
step, so a batch of streams reads the union of its experts once.

An expert that many tokens chose in one call (a prompt's) is compute-bound, not memory-bound: on
a CPU with bf16 instructions it runs as bf16 GEMMs instead, on tiles dequantized for the call, on
oneDNN (AMX where the CPU has it), whose bf16 peak the dot products reach a half of (Zen 4) or a
sixth (AMX Xeon)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybrid.experts.torch_backend import TorchExperts
from hybrid.experts.weights import ExpertWeights
from hybrid.native import build
from placement.cpu_probe import bf16_math, has
from placement.model_spec import DOT_GEMM_MIN_TOKENS, int4_dot_fits

# Tokens per call of the kernel: its scratch holds each (token, expert) pair's activations and
# output (at Kimi's sizes ~35 KB a pair), and past a few hundred tokens a call's weights are read
# once for many tokens anyway.
CHUNK = 1024
GEMM_TOKENS = 32  # tokens an expert's GEMMs are padded to a multiple of (`DotExperts.mlp`)
# rows of an expert's matrix dequantized at a time for its GEMM: 7 MB at Kimi's hidden size, within
# the last-level cache, and N wide enough for oneDNN's GEMM to run near its peak
TILE_ROWS = 512
# the kernel's instruction sets, strongest first: name, the code the kernel takes, CPU flags
ISAS = (("avx512_vnni", 2, ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")), ("avx2", 1, ("avx2", "fma")))


def runnable() -> list[str]:
    """The kernel's instruction sets that this CPU executes, strongest first."""
    return [name for name, _, flags in ISAS if has(*flags)]


def why_not() -> str | None:
    """Why the kernel cannot run here, or None when it can."""
    return "this CPU lacks AVX2, the least the INT4 dot kernel needs" if not runnable() else build.why_not()


def layout_order(k: int, lanes: int = 16) -> torch.Tensor:
    """For each column of `hybrid_int4_dequantize`'s rows of K values, which value of the checkpoint's
    row it holds: byte p of the reordered row is byte m of block b (int4_moe.cpp's `position`), and
    holds values 32b + 2m (column p) and 32b + 2m + 1 (column K / 2 + p)."""
    blocks = k // 32
    b, m = torch.arange(blocks)[:, None], torch.arange(16)[None]
    s = b // lanes
    left = (blocks - s * lanes).clamp(max=lanes)
    at = (s * lanes * 16 + m // 4 * left * 4 + b % lanes * 4 + m % 4).flatten()
    order = torch.empty(k, dtype=torch.int64)
    order[at] = (32 * b + 2 * m).flatten()
    order[k // 2 + at] = (32 * b + 2 * m + 1).flatten()
    return order


class DotExperts(TorchExperts):
    """The dot kernel; and, where the CPU multiplies bf16 in hardware (`bf16_math`), for experts with
    `DOT_GEMM_MIN_TOKENS` pairs or more in a call, TorchExperts' grouped GEMMs on experts dequantized
    from the kernel's layout. Those come with their columns in the layout's order, so the hidden
    state is put in the same order first (`layout_order`), and gate's and up's rows in the order of
    down's columns."""

    name = "dot"

    def __init__(self, weights: ExpertWeights, isa: str | None = None, gemms: bool | None = None):
        """`isa`: one of `runnable()` (default: the strongest); `gemms`: run experts with many tokens as
        bf16 GEMMs (default: where `bf16_math()` and the layout is AVX-512's, which they need)."""
        assert self.fits(weights), "INT4 weights on the CPU in sizes the kernel takes"
        if gemms and not bf16_math():
            raise ValueError("the dot backend's bf16 GEMMs need AVX512-BF16, which this CPU lacks")
        super().__init__(weights, torch.bfloat16)
        self.weights = None  # only the reordered copy is kept
        self.isa = isa or runnable()[0]
        self.code = next(c for name, c, _ in ISAS if name == self.isa)
        self.lib = build.load()
        assert self.lib is not None, why_not()
        self.shape = (weights.num_experts, weights.hidden_size, weights.intermediate_size, weights.group_size)
        self.values = tuple(self._repack(t) for t in (weights.gate, weights.up, weights.down))
        self.scales = tuple(t.to(torch.bfloat16).contiguous() for t in
                            (weights.gate_scale, weights.up_scale, weights.down_scale))
        self.gemms = (bf16_math() if gemms is None else gemms) and self.isa == "avx512_vnni"
        self.gemm_min_tokens = DOT_GEMM_MIN_TOKENS if self.gemms else None
        self.kernel = f"hybrid INT4 x int8 dot ({self.isa})" + (", bf16 GEMMs for prompts" if self.gemms else "")
        self.order = layout_order(weights.hidden_size), layout_order(weights.intermediate_size)
        # the stored row each dequantized row of gate, up and down is: gate's and up's in down's column order
        self.rows = self.order[1], self.order[1], torch.arange(weights.hidden_size)

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

    def mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its tokens x [n, H] (bf16, columns in the layout's order) as bf16 GEMMs, computed
        transposed so that each tile's product is a contiguous block of rows of its output. The tokens
        are padded to a multiple of GEMM_TOKENS: oneDNN builds its GEMM anew for each shape it has
        not met (0.4-0.5 ms, more than a small expert's product), and a prompt's experts would
        otherwise bring new token counts every time."""
        n = x.shape[0]
        xt = F.pad(x, (0, 0, 0, -n % GEMM_TOKENS)).T
        h = F.silu(self._product(0, e, xt)) * self._product(1, e, xt)  # rows in the order of down's columns
        return self._product(2, e, h)[:, :n].T  # TorchExperts.forward reads it in its own pass

    def _product(self, i: int, e: int, xt: torch.Tensor) -> torch.Tensor:
        """W @ xt for W expert e's gate, up or down (i = 0, 1, 2) and xt [in, n]: TILE_ROWS of W's rows
        dequantized at a time into a tile that stays in the caches for its GEMM (a whole Kimi expert
        in bf16, 88 MB, would be written to memory and read back). Gate's and up's rows come in the
        order of down's columns."""
        values, scales, stored = self.values[i][e], self.scales[i][e], self.rows[i]
        rows, k = values.shape[0], 2 * values.shape[1]
        out = torch.empty(rows, xt.shape[1], dtype=torch.bfloat16)
        tile = torch.empty(min(TILE_ROWS, rows), k, dtype=torch.bfloat16)
        for r in range(0, rows, TILE_ROWS):
            n = min(TILE_ROWS, rows - r)
            if self.lib.hybrid_int4_dequantize(self.code, n, k, self.shape[3], values.data_ptr(), scales.data_ptr(),
                                               stored[r].data_ptr(), tile.data_ptr()):
                raise RuntimeError(f"the bf16 GEMMs need the AVX-512 layout and AVX512-BF16 ({self.isa} here)")
            torch.mm(tile[:n], xt, out=out[r:r + n])
        return out

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Sum over k of topk_weights[t, k] * expert[topk_ids[t, k]](hidden[t]); a slot whose id is
        negative belongs to another backend and is skipped."""
        experts, hidden_size, intermediate, group = self.shape
        ids = topk_ids.to(torch.int64).contiguous()
        w = topk_weights.to(torch.float32).contiguous()
        gemms = None  # the experts run as GEMMs, summed per token
        if self.gemms and ids.shape[0] >= self.gemm_min_tokens:
            many = torch.bincount(ids[ids >= 0], minlength=experts) >= self.gemm_min_tokens
            on_gemms = (ids >= 0) & many[ids.clamp(min=0)]
            if on_gemms.any():
                gemms = super().forward(hidden[:, self.order[0]], ids.where(on_gemms, -1), w)
                ids = ids.masked_fill(on_gemms, -1)
                if not (ids >= 0).any():
                    return gemms
        x = hidden.to(torch.float32).contiguous()  # what the dot products quantize
        out = torch.empty(x.shape[0], hidden_size, dtype=torch.float32)
        for s in range(0, x.shape[0], CHUNK):
            rc = self.lib.hybrid_int4_moe(self.code, min(CHUNK, x.shape[0] - s), hidden_size, intermediate, group,
                                          experts, ids.shape[1], x[s].data_ptr(), ids[s].data_ptr(), w[s].data_ptr(),
                                          *(t.data_ptr() for t in (*self.values, *self.scales)), out[s].data_ptr())
            if rc:
                raise RuntimeError(f"the INT4 dot kernel has no {self.isa} code in this build")
        if gemms is not None:
            out += gemms
        return out.to(hidden.dtype)
