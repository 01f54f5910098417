"""Next tokens for a batch of sequences, each with its own sampling parameters, in one pass of
tensor ops over the batch.

Log-probabilities, for the sequences that ask for them, are the log-softmax of the logits the
sampler starts from: the model's, after logits processors (grammars) and penalties, before
temperature and the top-k / top-p / min-p filters (so, as OpenAI's, they do not depend on those).

Sampling uses the exponential race (argmax of probs / Exp(1) noise), which draws exactly from
`probs`; each seeded sequence draws its noise from its own generator, so its tokens do not depend
on what else shares the batch. The math runs where the logits are; the noise is drawn on the CPU
(where the generators live), so a seed gives the same tokens on any device.
"""

from __future__ import annotations

import torch

from hybrid.engine.request_output import TokenLogprob
from hybrid.engine.sampling_params import SamplingParams


def sample(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits [B, vocab] float32 (modified in place); outputs: each sequence's generated ids."""
    for i, p in enumerate(params):
        for process in p.logits_processors:
            logits[i] = process(outputs[i], logits[i])
    apply_penalties(logits, params, outputs)
    tokens = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        probs = _probs(logits[rows], [params[i] for i in rows])
        noise = torch.stack([torch.empty(probs.shape[1]).exponential_(generator=generators[i]) for i in rows])
        tokens[rows] = (probs / noise.to(probs.device)).argmax(-1)
    return tokens.tolist()


def token_logprobs(logits: torch.Tensor, params: list[SamplingParams], tokens: list[int]) -> list[TokenLogprob | None]:
    """Each sampled token's log-probability and its sequence's `logprobs` most likely tokens', for
    the sequences that ask (None for the others); `logits` as `sample` left them."""
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list[TokenLogprob | None] = [None] * len(params)
    if not rows:
        return out
    logprobs = logits[rows].float().log_softmax(-1)
    chosen = logprobs.gather(1, torch.tensor([[tokens[i]] for i in rows], device=logits.device))[:, 0].tolist()
    k = max(params[i].logprobs for i in rows)
    values, ids = logprobs.topk(k, -1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    for j, i in enumerate(rows):
        top = zip(ids[j, :params[i].logprobs].tolist(), values[j, :params[i].logprobs].tolist())
        out[i] = TokenLogprob(tokens[i], chosen[j], [(t, v) for t, v in top if v > float("-inf")])
    return out


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams], outputs: list[list[int]]) -> None:
    """OpenAI's presence and frequency penalties, over the tokens generated so far."""
    rows = [i for i, p in enumerate(params) if (p.presence_penalty or p.frequency_penalty) and outputs[i]]
    if not rows:
        return
    device = logits.device
    counts = torch.zeros(len(rows), logits.shape[1], device=device)
    for j, i in enumerate(rows):
        counts[j].index_add_(0, torch.tensor(outputs[i], device=device), torch.ones(len(outputs[i]), device=device))
    presence = torch.tensor([params[i].presence_penalty for i in rows], device=device)[:, None]
    frequency = torch.tensor([params[i].frequency_penalty for i in rows], device=device)[:, None]
    logits[rows] -= frequency * counts + presence * (counts > 0)


def _probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p filtering: [B, vocab] probabilities."""
    device = logits.device
    logits = logits / torch.tensor([p.temperature for p in params], device=device)[:, None]
    top_k = torch.tensor([p.top_k for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    if (top_k > 0).any() or (top_p < 1).any():
        ranked, order = logits.sort(dim=-1, descending=True)
        rank = torch.arange(logits.shape[1], device=device)[None, :]
        drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
        sorted_probs = ranked.masked_fill(drop, float("-inf")).softmax(-1)
        drop |= sorted_probs.cumsum(-1) - sorted_probs >= top_p[:, None]  # keep while the mass before < top_p
        logits = logits.scatter(1, order, ranked.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    min_p = torch.tensor([p.min_p for p in params], device=device)[:, None]
    if (min_p > 0).any():
        probs = probs.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, 0)
    return probs

