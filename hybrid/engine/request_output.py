"""What the engine reports about a request after a step: its new tokens and text (with their
log-probabilities when asked), and whether it is done."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """A sampled token's log-probability under the distribution the sampler drew from, and the
    most likely tokens' (best first)."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]  # generated since the last output (a stop token included)
    text: str  # text of those tokens ("" without a tokenizer); stop tokens and stop strings excluded
    finish_reason: str | None  # None while running; "stop", "length", "abort" or "error"
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens whose latents came from the prefix cache
    num_output_tokens: int
    error: str | None = None  # what went wrong, with finish_reason "error"
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the request asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
