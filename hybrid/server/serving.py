"""What every API's handlers share: the engine's thread, the tokenizer, the served name, metrics;
rendering a conversation into prompt ids, holding a reply to what the request asks (a grammar, a
thinking budget), and running a request with its metrics recorded."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import torch

from hybrid.api import load_model
from hybrid.engine import Engine, EngineConfig, EngineThread, PromptTooLong, RequestOutput, SamplingParams
from hybrid.engine.constrained import OneToolCall, ThinkingBudget, json_grammar, tool_call_grammar
from hybrid.engine.grammar import GrammarError, GrammarProcessor
from hybrid.experts.cpu import threads_of
from hybrid.server.conversation import Conversation
from hybrid.server.errors import APIError
from hybrid.server.metrics import Metrics
from hybrid.server.tool_ids import next_call_index
from hybrid.tokenizer import Tokenizer

DISCONNECT_POLL_S = 0.1


@dataclass
class Serving:
    thread: EngineThread  # owns the engine: requests and its limits go through it
    tokenizer: Tokenizer
    model_name: str
    metrics: Metrics
    summary: list[str]  # what is served and how (`hybrid serve` prints it as it starts)
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def load(cls, folder: str | Path, profile=None, model_name: str | None = None,
             dtype: torch.dtype = torch.bfloat16, config: EngineConfig | None = None, progress=None) -> "Serving":
        """Load a checkpoint folder and start its engine thread. `profile`: what `load_model`
        takes (a placement Profile or its path, Settings, ...), which also sizes the KV cache unless
        `config` is given; `model_name` defaults to the folder's name; `progress(done, total)`
        follows the loading. The model runs a warm-up before the engine starts (`warm_up`)."""
        folder = Path(folder)
        tokenizer = Tokenizer.from_pretrained(folder)

        def build() -> Engine:  # on the engine thread (engine_thread.py says why)
            model = load_model(folder, profile, dtype=dtype, progress=progress)
            model.warm_up()
            return Engine(model, tokenizer, config)

        thread = EngineThread(build).start()
        name = model_name or folder.name
        return cls(thread, tokenizer, name, Metrics(thread.engine), summary(thread.engine, name))

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None, thinking: bool = True,
                    preserve_thinking: bool = False) -> list[int]:
        """Prompt ids of OpenAI-style message dicts (assistant reasoning in `reasoning_content` or
        `reasoning`, client tool-call ids of any form)."""
        messages = [{**m, "role": "system" if m["role"] == "developer" else m["role"],
                     "reasoning_content": m.get("reasoning_content") or m.get("reasoning")} for m in messages]
        return self.tokenizer.apply_chat_template(kimi_tool_ids(messages), tools or None, thinking=thinking,
                                                  preserve_thinking=preserve_thinking)

    def conversation_prompt(self, c: Conversation) -> list[int]:
        return self.chat_prompt(c.messages, c.tools, c.thinking, c.preserve)

    def constrain(self, params: SamplingParams, c: Conversation, prompt_len: int) -> None:
        """Hold the reply to what the conversation asks: a forced tool call or a structured answer to
        its grammar, enabled thinking to its budget, the tool calls to one."""
        if c.forced:
            self.hold(params, tool_call_grammar(c.forced, next_call_index(c.messages)), "tool_choice", prompt_len)
        elif c.answer_schema is not None:
            self.hold(params, json_grammar(c.answer_schema), c.answer_param, prompt_len)
        elif c.thinking and c.thinking_budget:
            params.logits_processors.append(ThinkingBudget(self.tokenizer, c.thinking_budget))
        if c.one_call and c.tools and not c.forced:
            params.logits_processors.append(OneToolCall(self.tokenizer))

    def hold(self, params: SamplingParams, grammar: str, param: str, prompt_len: int) -> None:
        """Hold the reply to `grammar` within its token budget; a 400 naming `param` if it cannot be."""
        room = self.thread.max_model_len - prompt_len
        try:
            processor = GrammarProcessor(self.tokenizer, grammar, min(params.max_tokens or room, room))
        except GrammarError as e:
            raise APIError(400, f"{param}: the schema cannot be enforced: {e}", param=param) from None
        params.logits_processors.append(processor)

    def check_prompt(self, prompt_ids: list[int], param: str = "messages") -> None:
        """A prompt that cannot fit is the client's error (400), found before any response starts."""
        try:
            self.thread.check_prompt(len(prompt_ids))
        except PromptTooLong as e:
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e), param=param) from None

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       arrival: float | None = None) -> AsyncIterator[RequestOutput]:
        """The request's outputs; latency and token counts go to the metrics. An engine failure
        is raised as a 500 APIError."""
        start = arrival or time.monotonic()
        last = None
        reason = "abort"
        m = self.metrics
        try:
            async for out in self.thread.generate(prompt_ids, params):
                now = time.monotonic()
                if out.token_ids:
                    (m.ttft if last is None else m.itl).observe(now - (last or start))
                    last = now
                    m.generation_tokens.inc(len(out.token_ids))
                if out.finished:
                    reason = out.finish_reason
                    m.prompt_tokens.inc(out.num_prompt_tokens)
                    m.cached_tokens.inc(out.num_cached_tokens)
                    if reason == "error":
                        raise APIError(500, out.error or "the engine failed")
                    if reason == "shutdown":
                        raise APIError(503, out.error or "the server is shutting down")
                yield out
        finally:
            m.requests.labels(reason).inc()


def summary(engine: Engine, model_name: str) -> list[str]:
    """What is served and how, in a few lines."""
    model, pages = engine.model, engine.pages
    cfg, p = model.config, model.layout
    quant = {"compressed-tensors": "int4", "fp8": "fp8"}.get(cfg.quant.method, "?") if cfg.quant else "bf16"
    devices = sorted({p.embed, p.lm_head, *p.layers.values()})
    hot = sum(len(ids) for ids in p.hot_experts.values())
    kernels = sorted({f"{e.cpu.name}: {e.cpu.kernel}, {threads_of(e.cpu)}" for e in model.moe_experts()})
    return [
        f"model: {model_name} ({model.folder}): {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} "
        f"routed experts of which {cfg.num_experts_per_tok} per token ({quant}), computing in "
        f"{str(model.dtype).removeprefix('torch.')}",
        f"placement: dense layers, attention and KV cache on {', '.join(devices)}; routed experts on the CPU"
        + (f", {hot:,} of them on GPUs" if hot else "")
        + (f"; prompts of {p.stream_threshold:,}+ tokens stream experts to the GPU" if p.stream_threshold else ""),
        *(f"CPU experts: {k}" for k in kernels),
        f"CPU dense projections: {model.dense_kernel}",
        f"context: {engine.max_model_len:,} tokens per request; KV cache {pages.num_pages * pages.page_size:,} "
        f"tokens ({pages.num_pages:,} pages of {pages.page_size}, {engine.config.kv_dtype}"
        + (f", {(pages.num_pages - pages.device_pages) * pages.page_size:,} tokens in host RAM"
           if pages.device_pages < pages.num_pages else "")
        + f"), up to {engine.config.max_running} requests "
        f"at once, {engine.config.max_batch_tokens:,} tokens per step",
        "thinking: on by default for /v1/chat/completions (Moonshot's default for Kimi; send \"thinking\": "
        "{\"type\": \"disabled\"} to turn it off), off for /v1/messages unless the request sends \"thinking\" "
        "(Anthropic's default)",
    ]


def kimi_tool_ids(messages: list[dict]) -> list[dict]:
    """Tool-call ids rewritten to Kimi's `functions.{name}:{idx}` (idx counting calls over the
    conversation, as the model was trained), tool results' references with them: clients send ids
    of their own (`call_...`, `toolu_...`)."""
    renamed: dict[str, str] = {}
    out, n = [], 0
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                new = f"functions.{call['function']['name']}:{n}"
                n += 1
                if call.get("id"):
                    renamed[call["id"]] = new
                calls.append({**call, "id": new})
            m = {**m, "tool_calls": calls}
        if m["role"] == "tool" and m.get("tool_call_id") in renamed:
            m = {**m, "tool_call_id": renamed[m["tool_call_id"]]}
        out.append(m)
    return out


async def with_silences(items: AsyncIterator, seconds: float) -> AsyncIterator:
    """The items, with None after every `seconds` without one. Closing this closes `items`."""
    it = aiter(items)
    pending = asyncio.ensure_future(anext(it))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=seconds)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(anext(it))
    finally:
        pending.cancel()
        with contextlib.suppress(BaseException):
            await pending
        await it.aclose()


async def until_disconnected(request, outputs: AsyncIterator) -> AsyncIterator:
    """Outputs for a non-streamed response. The client is watched while the model is silent too
    (reading a long prompt yields nothing for minutes): if it leaves, the generation is aborted
    within DISCONNECT_POLL_S and its pages freed."""
    ticks = with_silences(outputs, DISCONNECT_POLL_S)
    try:
        async for item in ticks:
            if await request.is_disconnected():
                raise APIError(499, "the client closed the connection")
            if item is not None:
                yield item
    finally:
        await ticks.aclose()
