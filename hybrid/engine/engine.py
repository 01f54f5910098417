"""The engine: requests in, a step at a time, tokens and text out. Single-threaded; see
engine_thread.py for the thread that serves it to async code."""

from __future__ import annotations

import itertools

import torch

from hybrid.api import HybridModel
from hybrid.settings import EngineConfig
from hybrid.engine.model_runner import ModelRunner
from hybrid.engine.page_manager import PageManager
from hybrid.engine.request_output import RequestOutput, TokenLogprob
from hybrid.engine.sampler import sample, token_logprobs
from hybrid.engine.sampling_params import SamplingParams
from hybrid.engine.scheduler import Scheduler
from hybrid.engine.sequence import Sequence
from hybrid.engine.text_stream import TextStream
from hybrid.tokenizer import Detokenizer, Tokenizer


class PromptTooLong(ValueError):
    """A prompt that can never fit the context or the KV cache."""


class Engine:
    def __init__(self, model: HybridModel, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None):
        """`config`: the model's settings' engine configuration unless given."""
        self.config = config = config or model.settings.engine
        self.model, self.tokenizer = model, tokenizer
        cfg = model.config
        num_pages = config.num_pages(cfg, model.dtype.itemsize)
        self.pages = PageManager(num_pages, config.page_size, config.device_pages(num_pages))
        self.runner = ModelRunner(model, self.pages, config.kv_dtype)
        self.scheduler = Scheduler(self.pages, config.max_batch_tokens, config.max_running)
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings,
                                 self.pages.num_pages * self.pages.page_size)
        self.stop_ids = tokenizer.eos_ids if tokenizer else frozenset({cfg.eos_token_id} - {None})
        self.requests: dict[str, Sequence] = {}
        self._ids = itertools.count()

    def __bool__(self) -> bool:
        """Whether any request is unfinished."""
        return bool(self.scheduler)

    @property
    def forward_seconds(self) -> float:
        return self.runner.forward_seconds

    def expert_wait_s(self) -> float:
        """Seconds forward passes have waited for routed experts."""
        return self.model.expert_wait_s()

    def check_prompt(self, num_tokens: int) -> None:
        """Raise PromptTooLong unless a prompt of num_tokens leaves room for one generated token."""
        if num_tokens == 0:
            raise ValueError("the prompt is empty")
        if num_tokens + 1 > self.max_model_len:
            raise PromptTooLong(f"the prompt has {num_tokens} tokens; this server's context holds "
                                f"{self.max_model_len} tokens, and at least one must be left to generate")

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        self.check_prompt(len(prompt_ids))
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} is already running")
        room = self.max_model_len - len(prompt_ids)
        seq = Sequence(request_id, list(prompt_ids), params, min(params.max_tokens or room, room))
        if self.tokenizer is not None:
            seq.text = TextStream(Detokenizer(self.tokenizer), params.stop)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str, reason: str = "abort", error: str | None = None) -> RequestOutput | None:
        """Finish a request now and free its pages; None if it is unknown or already done."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, reason)
        return self._output(seq, [], "", error)

    def abort_all(self, reason: str, error: str | None = None) -> list[RequestOutput]:
        return [self.abort(rid, reason, error) for rid in list(self.requests)]

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one forward pass; an output for every sequence that sampled a token."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        logits = self.runner.run(scheduled)
        sampling = [seq for seq, n in scheduled if seq.num_computed + n == len(seq)]
        for seq, n in scheduled:
            seq.num_computed += n
            self.pages.publish(seq)
        params = [s.params for s in sampling]
        tokens = sample(logits, params, [s.output_ids for s in sampling], [s.generator for s in sampling])
        logprobs = token_logprobs(logits, params, tokens)
        return [self._append(seq, token, lp) for seq, token, lp in zip(sampling, tokens, logprobs)]

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
        """Run prompts to completion (offline use): each one's generated ids."""
        ids = [self.add_request(p, params) for p in prompts]
        out = {rid: [] for rid in ids}
        while self:
            for o in self.step():
                out[o.request_id] += o.token_ids
        return [out[rid] for rid in ids]

    def _append(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> RequestOutput:
        seq.token_ids.append(token)
        text, reason, hit = "", None, False
        if token in self.stop_ids or token in seq.params.stop_token_ids:
            reason = "stop"
        elif seq.text is not None:
            text, hit = seq.text.feed(token)
            reason = "stop" if hit else None
        if reason is None and seq.num_output_tokens >= seq.max_tokens:
            reason = "length"
        if reason is not None:
            if seq.text is not None and not hit:
                text += seq.text.flush()
            del self.requests[seq.request_id]
            self.scheduler.finish(seq, reason)
        return self._output(seq, [token], text, logprobs=None if logprob is None else [logprob])

    def _output(self, seq: Sequence, token_ids: list[int], text: str, error: str | None = None,
                logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        return RequestOutput(seq.request_id, token_ids, text, seq.finish_reason, seq.num_prompt_tokens,
                             max(seq.num_cached_tokens, 0), seq.num_output_tokens, error, logprobs)
