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
    warm-up step, which is not counted). Another prompt of that length goes first, not counted
    either: the first of a length pays once for what later ones find built (oneDNN's GEMMs for its
    shapes, the heap grown to its size), 1.5-2x the default model's steady prefill."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, prompt_tokens), generator=torch.Generator().manual_seed(seed))
    cache = model.new_cache(prompt_tokens + decode_tokens + 1)
    model.forward(ForwardBatch.single(ids[1], 0, torch.arange(prompt_tokens)), cache)
    ids = ids[0]
    t = time.perf_counter()
    logits = model.forward(ForwardBatch.single(ids, 0, torch.arange(prompt_tokens)), cache)
    prefill_s = time.perf_counter() - t
    token, pos = int(logits[0].argmax()), prompt_tokens
    decode_s = expert_s = 0.0
    for step in range(decode_tokens + 1):
        batch = ForwardBatch.single(torch.tensor([token]), pos, torch.arange(pos + 1))
        waited = model.expert_wait_s()
        t = time.perf_counter()
        logits = model.forward(batch, cache)
        if step:  # the first step warms up
            decode_s += time.perf_counter() - t
            expert_s += model.expert_wait_s() - waited
        token, pos = int(logits[0].argmax()), pos + 1
    return Speed(prompt_tokens, prefill_s, decode_tokens, decode_s, expert_s)


def best_seconds(call, repeats: int = 5) -> float:
    """The fastest of `repeats` calls, after one that warms up."""
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def host_gbps(threads: int | None = None) -> float:
    """Host memory read bandwidth: a sum over 1 GiB with `threads` torch threads (default: torch's
    own count), the best of a few. The floor every CPU figure is set beside."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        a = torch.ones(2**28, dtype=torch.float32)
        return a.nbytes / best_seconds(a.sum) / 1e9
    finally:
        torch.set_num_threads(before)


def gemm_tflops(size: int = 2048) -> dict[str, float]:
    """TFLOP/s of a size^3 GEMM in each dense kernel the runtime can use here (bf16 and fp32
    through torch, bf16 through oneDNN where it runs): the compute floor's peak is the best."""
    from hybrid.model.dense_kernel import OneDNNLinear, supported

    flops = 2 * size**3
    a, w = torch.randn(size, size), torch.randn(size, size)
    out = {"torch fp32": flops / best_seconds(lambda: a @ w.T, 3) / 1e12}
    ab, wb = a.bfloat16(), w.bfloat16()
    out["torch bf16"] = flops / best_seconds(lambda: ab @ wb.T, 3) / 1e12
    if "onednn" in supported():
        packed = OneDNNLinear(wb)
        out["onednn bf16"] = flops / best_seconds(lambda: packed(ab), 3) / 1e12
    return out
