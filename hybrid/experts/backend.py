"""The expert-backend interface: where one layer's routed experts run.

A backend holds one MoE layer's routed experts. `submit` starts the weighted sum of the chosen
experts for a batch of tokens and returns at once, so the caller can compute the shared expert
(and anything else) meanwhile; `wait` returns the result. Exactly one submit is outstanding.
"""

from __future__ import annotations

from typing import Protocol

import torch


class ExpertBackend(Protocol):
    name: str

    def submit(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        """hidden [T, H]; topk_ids [T, K] int64; topk_weights [T, K] float32. Returns immediately."""

    def wait(self) -> torch.Tensor:
        """[T, H] in hidden's dtype: sum over k of topk_weights[t, k] * expert[topk_ids[t, k]](hidden[t])."""
