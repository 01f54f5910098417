"""The caller's share of a layer: the core a pool leaves to the caller computes the last rows of
every expert's intermediate dimension with torch while kt computes the others, then blocks in
`sync()`, which leaves the core to the queue thread. The split is fixed at load, sized by the
kernels' relative speed."""

from __future__ import annotations

from hybrid.experts.weights import ExpertWeights

# Per-thread speed of each kt kernel over torch's on the same rows at T = 1 (torch: the int4
# kernel for INT4, bf16 matmuls for float experts), measured on an AVX-512 machine without AMX.
# It only balances the caller's share.
KT_OVER_TORCH = {"AMXInt4_KGroup_MOE": 1.4, "AVX2RawInt4_MOE": 0.45, "AMXInt8_MOE": 1.6, "AMXInt4_MOE": 2.8,
                 "AMXBF16_MOE": 0.85, "AVX2BF16_MOE": 0.85}


def slice_rows(w: ExpertWeights, start: int, stop: int) -> ExpertWeights:
    """Rows [start, stop) of every expert's intermediate dimension: gate and up rows, down columns."""
    if (start, stop) == (0, w.intermediate_size):
        return w
    per_word = 8 if w.format == "int4" else 1
    cut = {"gate": (slice(start, stop), None), "up": (slice(start, stop), None),
           "down": (None, slice(start // per_word, stop // per_word)),
           "gate_scale": (slice(start, stop), None), "up_scale": (slice(start, stop), None),
           "down_scale": (None, slice(start // w.group_size, stop // w.group_size))}
    fields = {}
    for f in ExpertWeights.FIELDS:
        t = getattr(w, f)
        if t is not None:
            r, c = cut[f]
            fields[f] = (t[:, r] if r else t[:, :, c]).contiguous()
    return ExpertWeights(w.format, group_size=w.group_size, **fields)


def share_rows(size: int, unit: int, kernel: str, kt_threads: int) -> int:
    """Rows of each expert the caller's core computes so that both sides finish together; kt keeps
    a multiple of `unit`."""
    return min(round(size / (1 + KT_OVER_TORCH[kernel] * kt_threads) / unit) * unit, size - unit)
