"""Dense projections on the CPU in the kernel this CPU runs fastest, measured once per process.

A decode step reads every dense weight once for one token: its time is bytes / bandwidth.
torch's own bf16 matmul reads a weight at about half the bandwidth there. oneDNN, given the
weight once in its blocked layout, reads it at ~0.6-0.75 of what a plain sum over the same bytes
reaches, on CPUs with bf16 instructions. A GEMV that torch's compiler (Inductor) generates for
this one job, widen each bf16 row to fp32 and multiply-add it into one sum, streams the weight as
fast as that sum on a wide weight (measured on Zen 4: 45 against oneDNN's 33 GB/s for the lm_head),
though not on a long one (past 4,096 inputs Inductor splits the reduction: 26 against oneDNN's 53
GB/s for an MLP's 5,632-wide down projection, on another Zen 4 VM where oneDNN also read the lm_head
as fast); more tokens than one go to torch's GEMM, which keeps the weight in its plain layout. Which kernel
wins is timed on weights larger than the caches, not assumed from the instruction set; all
compute in fp32 from the checkpoint's bf16 weights, so the choice changes speed, not results
beyond rounding.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn.functional as F
from torch import nn

from hybrid.model import compiled

KERNELS = ("torch", "onednn", "compiled")


class CompiledLinear(nn.Module):
    """A bias-free bf16 Linear whose one-token products run the compiled `gemv`; more tokens than
    one run torch's GEMM on the same weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # a plain tensor, as oneDNN's is: the compiler would build a kernel per Parameter's shape
        self.weight = weight.detach().to(torch.bfloat16).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features:
            return compiled.gemv(self.weight, x.reshape(-1).to(torch.bfloat16)).view(*x.shape[:-1], self.out_features)
        return F.linear(x.to(torch.bfloat16), self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=compiled bf16 GEMV"


class OneDNNLinear(nn.Module):
    """A bias-free bf16 Linear whose weight oneDNN holds in its own layout (reordered once)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # opaque to everything but oneDNN; as `weight` it still tells its dtype, device and size
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16).contiguous(), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), self.weight, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel=onednn bf16"


def supported() -> tuple[str, ...]:
    """The kernels that run here: oneDNN's bf16 path needs bf16 instructions (AVX512-BF16 or AMX),
    the compiled GEMV a C++ compiler."""
    runs = {"torch": True, "onednn": torch.ops.mkldnn._is_mkldnn_bf16_supported(), "compiled": compiled.available()}
    return tuple(k for k in KERNELS if runs[k])


PACKED = {"onednn": OneDNNLinear, "compiled": CompiledLinear}


# one-token projections the choice is timed on, 64 MiB each (beyond the caches): a wide one, as
# attention's and the lm_head's are, and a long one, as an MLP's down projection is (a kernel can
# be fast on one and slow on the other: Inductor's GEMV splits reductions past 4,096)
SHAPES = ((8192, 4096), (2048, 16384))


@functools.cache
def fastest(rounds: int = 7) -> str:
    """The kernel that runs one-token projections of bf16 weights (`SHAPES`) fastest here: each
    kernel's best time on each shape, summed; the kernels take turns round by round, so that a
    swing in the host's bandwidth (this can move by 2x within minutes on a shared VM) does not fall
    on one kernel's calls only."""
    kernels = supported()
    if len(kernels) == 1:
        return kernels[0]
    best = {(k, shape): float("inf") for k in kernels for shape in SHAPES}
    for shape in SHAPES:
        weight = torch.full(shape, 0.01, dtype=torch.bfloat16)  # values do not change the speed
        x = torch.ones(1, shape[1], dtype=torch.bfloat16)
        calls = {k: PACKED[k](weight) if k in PACKED else functools.partial(F.linear, weight=weight) for k in kernels}
        for f in calls.values():
            f(x)
        for _ in range(rounds):
            for kernel, f in calls.items():
                start = time.perf_counter()
                f(x)
                best[kernel, shape] = min(best[kernel, shape], time.perf_counter() - start)
    return min(kernels, key=lambda k: sum(best[k, shape] for shape in SHAPES))


def pack(model: nn.Module, kernel: str | None = None) -> str:
    """Put every bias-free bf16 `nn.Linear` of `model` that lives on the CPU on `kernel` (default:
    the fastest here), but those of modules that read their weights themselves (`reads_own_weights`:
    MLA's native decode). Returns the kernel used."""
    kernel = kernel or fastest()
    if kernel not in supported():
        raise ValueError(f"dense kernel {kernel!r} does not run on this CPU; choose one of {', '.join(supported())}")
    if kernel == "torch":
        return kernel
    own = [name + "." for name, m in model.named_modules() if getattr(m, "reads_own_weights", False)]
    for name, module in list(model.named_modules()):
        if any(name.startswith(prefix) for prefix in own):
            continue  # a module whose own kernel reads these weights in their plain layout
        if (type(module) is nn.Linear and module.bias is None and module.weight.device.type == "cpu"
                and module.weight.dtype == torch.bfloat16):
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, PACKED[kernel](module.weight))
    return kernel
