"""A linear layer whose weight stays in DeepSeek block FP8 (half the bytes of bf16, as the
planner budgets it) and is dequantized as it runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybrid.quant import dequantize_fp8_block


class Fp8Linear(nn.Module):
    def __init__(self, qweight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale_inv", scale_inv)
        self.block, self.dtype = block, dtype

    @property
    def weight(self) -> torch.Tensor:
        return dequantize_fp8_block(self.qweight, self.scale_inv, self.block, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))
