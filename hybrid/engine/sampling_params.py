"""What a request asks of the sampler and when its generation ends."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

# Rewrites one sequence's logits before sampling: (generated token ids, logits [vocab]) -> logits.
# The seam for constrained decoding (grammars, JSON schemas, forced tool calls).
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None  # None: until the context is full
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    logprobs: int | None = None  # report each token's log-probability and this many alternatives'

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 64):
            raise ValueError("seed must fit in 64 bits")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError("logprobs must be >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
