"""One request as the scheduler sees it: its tokens, where their latents live, how far it got."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto

import torch

from hybrid.engine.sampling_params import SamplingParams
from hybrid.engine.text_stream import TextStream


class Status(Enum):
    WAITING = auto()   # no pages; in the queue (new, or preempted to make room)
    RUNNING = auto()   # holds pages for all its tokens; prefilling until every token is computed
    FINISHED = auto()


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # params.max_tokens clipped to what the context can hold
    num_prompt_tokens: int = 0
    status: Status = Status.WAITING
    pages: list[int] = field(default_factory=list)
    page_hashes: list[bytes] = field(default_factory=list)  # of its full, computed pages, in order
    num_computed: int = 0  # leading tokens whose latents are in the cache
    num_cached_tokens: int = -1  # prompt tokens found in the prefix cache at first admission
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    text: TextStream | None = None  # with a tokenizer: the text so far, cut at stop strings

    def __post_init__(self):
        self.num_prompt_tokens = len(self.token_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens still to run through the model: the prompt's rest, or the last sampled token."""
        return len(self.token_ids) - self.num_computed
