"""A short, bounded measurement of prefill and decode speed of a loaded model, as placed.

What `hybrid bench` prints beside the planner's prediction, so an operator tunes a profile by
numbers. Random token ids: speed does not depend on what the tokens say.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hybrid.api import HybridModel
from hybrid.model.batch import ForwardBatch


@dataclass
class Speed:
    prompt_tokens: int
    prefill_s: float
    decode_tokens: int
    decode_s: float
    expert_s: float  # time spent waiting for routed experts during decode

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s


def measure(model: HybridModel, prompt_tokens: int = 512, decode_tokens: int = 32, seed: int = 0) -> Speed:
    """Prefill one prompt of `prompt_tokens`, then decode `decode_tokens` greedily (after one
    warm-up step, which is not counted)."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (prompt_tokens,), generator=torch.Generator().manual_seed(seed))
    cache = model.new_cache(prompt_tokens + decode_tokens + 1)
    t = time.perf_counter()
    logits = model.model(ForwardBatch.single(ids, 0, torch.arange(prompt_tokens)), cache)
    prefill_s = time.perf_counter() - t
    token, pos = int(logits[0].argmax()), prompt_tokens
    decode_s = expert_s = 0.0
    for step in range(decode_tokens + 1):
        batch = ForwardBatch.single(torch.tensor([token]), pos, torch.arange(pos + 1))
        waited = model.expert_wait_s()
        t = time.perf_counter()
        logits = model.model(batch, cache)
        if step:  # the first step warms up
            decode_s += time.perf_counter() - t
            expert_s += model.expert_wait_s() - waited
        token, pos = int(logits[0].argmax()), pos + 1
    return Speed(prompt_tokens, prefill_s, decode_tokens, decode_s, expert_s)
