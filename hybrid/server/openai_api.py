"""OpenAI's endpoints: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Request

from hybrid.engine import RequestOutput, SamplingParams
from hybrid.engine.constrained import OneToolCall, json_grammar, tool_call_grammar
from hybrid.server.errors import APIError, openai_error
from hybrid.server.logprobs import Logprobs
from hybrid.server.openai_schema import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk,
                                         ChatCompletionRequest, ChatMessage, ChoiceLogprobs, ChunkChoice, Completion,
                                         CompletionChoice, CompletionRequest, CompletionTokensDetails, Delta,
                                         FunctionCallOut, ModelCard, ModelList, NamedToolChoice, PromptTokensDetails,
                                         Sampling, TokenLogprobOut, ToolCallOut, Usage)
from hybrid.server.reply import ReplyEvent, ReplyParser
from hybrid.server.serving import Serving, until_disconnected
from hybrid.server.sse import DONE, sse, sse_response
from hybrid.server.tool_ids import next_call_index, reply_tool_ids
from hybrid.tokenizer import ReasoningDelta, TextDelta, ToolCallArgs, ToolCallStart

router = APIRouter()

Outputs = AsyncIterator[tuple[int, RequestOutput]]  # (choice index, output)


@router.get("/v1/models")
async def models(request: Request) -> ModelList:
    s: Serving = request.app.state.serving
    return ModelList(data=[ModelCard(id=s.model_name, created=s.created)])


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    arrival = time.monotonic()
    s: Serving = request.app.state.serving
    s.check_model(body.model)
    _check_messages(body.messages)
    tools = [t.model_dump(exclude_none=True) for t in body.tools or []] if body.tool_choice != "none" else []
    messages = [m.model_dump(exclude_none=True) for m in body.messages]
    grammar = _grammar(body, messages)
    thinking, preserve = body.thinking_switches()
    prompt = s.chat_prompt(messages, tools, thinking and grammar is None, preserve)
    s.check_prompt(prompt)
    params = _sampling(body, body.max_completion_tokens or body.max_tokens)
    for p in params:
        if grammar is not None:
            s.hold(p, grammar[0], grammar[1], len(prompt))
        elif tools and body.parallel_tool_calls is False:
            p.logits_processors.append(OneToolCall(s.tokenizer))
    parsers = [ReplyParser(s.tokenizer, prompt, parse_tools=bool(tools), call_id=reply_tool_ids("call_", prompt, i))
               for i in range(len(params))]
    logprobs = Logprobs(s.tokenizer, body.stop_token_ids or ())
    outputs = _merge([s.generate(prompt, p, arrival) for p in params])
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    if body.stream:
        def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
            return sse(ChatCompletionChunk(id=rid, created=created, model=s.model_name, choices=choices, usage=usage))

        async def stream() -> AsyncIterator[str]:
            for i in range(len(params)):
                yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content=""))])
            last: dict[int, RequestOutput] = {}
            pending: dict[int, list[TokenLogprobOut]] = {i: [] for i in range(len(params))}

            def held(i: int) -> ChoiceLogprobs | None:
                """The log-probabilities not yet sent with a chunk of choice i (a marker's tokens wait
                for the text they end up in)."""
                entries, pending[i] = pending[i], []
                return ChoiceLogprobs(content=entries) if entries else None

            try:
                async for i, out in outputs:
                    pending[i] += logprobs.entries(out)
                    for event in parsers[i].feed(out):
                        if (delta := _delta(event)) is not None:
                            yield chunk([ChunkChoice(index=i, delta=delta, logprobs=held(i))])
                    if out.finished:
                        last[i] = out
                        yield chunk([ChunkChoice(index=i, delta=Delta(), finish_reason=parsers[i].finish_reason(out),
                                                 logprobs=held(i))])
            except APIError as e:
                yield sse(openai_error(e))
            else:
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield chunk([], _usage([last[i] for i in range(len(params))], parsers))
            yield DONE

        return sse_response(stream())

    messages = [AssistantMessage() for _ in params]
    entries: list[list[TokenLogprobOut]] = [[] for _ in params]
    last = {}
    async for i, out in until_disconnected(request, outputs):
        entries[i] += logprobs.entries(out)
        for event in parsers[i].feed(out):
            _add(messages[i], event)
        if out.finished:
            last[i] = out
    finals = [last[i] for i in range(len(params))]
    asked = body.logprob_count() is not None
    return ChatCompletion(
        id=rid, created=created, model=s.model_name, usage=_usage(finals, parsers),
        choices=[ChatChoice(index=i, message=m, finish_reason=parsers[i].finish_reason(finals[i]),
                            logprobs=ChoiceLogprobs(content=entries[i]) if asked else None)
                 for i, m in enumerate(messages)])


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    arrival = time.monotonic()
    s: Serving = request.app.state.serving
    s.check_model(body.model)
    prompts = _prompt_ids(s, body.prompt)
    for prompt in prompts:
        s.check_prompt(prompt, "prompt")
    params = _sampling(body, body.max_tokens)
    jobs = [(prompt, p) for prompt in prompts for p in params]  # choice index = prompt index * n + j
    outputs = _merge([s.generate(prompt, p, arrival) for prompt, p in jobs])
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = [s.tokenizer.decode(prompt) if body.echo else "" for prompt, _ in jobs]
    logprobs = Logprobs(s.tokenizer, body.stop_token_ids or ())
    asked = body.logprob_count() is not None

    def usage(finals: list[RequestOutput]) -> Usage:
        return _make_usage(sum(o.num_prompt_tokens for o in finals[::len(params)]),
                           sum(o.num_cached_tokens for o in finals[::len(params)]),
                           sum(o.num_output_tokens for o in finals), 0)

    if body.stream:
        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            return sse(Completion(id=rid, created=created, model=s.model_name, choices=choices, usage=usage))

        async def stream() -> AsyncIterator[str]:
            last: dict[int, RequestOutput] = {}
            offsets = [0] * len(jobs)
            pending: list[list[TokenLogprobOut]] = [[] for _ in jobs]  # of tokens whose text is held back
            try:
                async for i, out in outputs:
                    text, echo[i] = echo[i] + out.text, ""
                    pending[i] += logprobs.entries(out)
                    if text or out.finished:
                        lp = logprobs.completion(pending[i], offsets[i]) if asked else None
                        offsets[i], pending[i] = offsets[i] + len(text), []
                        yield chunk([CompletionChoice(index=i, text=text, finish_reason=out.finish_reason,
                                                      logprobs=lp)])
                    if out.finished:
                        last[i] = out
            except APIError as e:
                yield sse(openai_error(e))
            else:
                if body.stream_options is not None and body.stream_options.include_usage:
                    yield chunk([], usage([last[i] for i in range(len(jobs))]))
            yield DONE

        return sse_response(stream())

    texts, last = list(echo), {}
    entries: list[list[TokenLogprobOut]] = [[] for _ in jobs]
    async for i, out in until_disconnected(request, outputs):
        texts[i] += out.text
        entries[i] += logprobs.entries(out)
        if out.finished:
            last[i] = out
    finals = [last[i] for i in range(len(jobs))]
    return Completion(id=rid, created=created, model=s.model_name, usage=usage(finals),
                      choices=[CompletionChoice(index=i, text=t, finish_reason=o.finish_reason,
                                                logprobs=logprobs.completion(entries[i]) if asked else None)
                               for i, (t, o) in enumerate(zip(texts, finals))])


# Content part types OpenAI's API defines for media: this text-only model cannot see them.
NON_TEXT_PARTS = ("image_url", "input_audio", "file")


def _check_messages(messages: list[ChatMessage]) -> None:
    """Refuse, as OpenAI's API does, what the prompt could not hold faithfully: content parts that
    are not text (this model reads text only: dropping them would answer a question the client
    did not ask) or of an unknown type, and tool results that answer no earlier tool call."""
    called: set[str] = set()
    for i, m in enumerate(messages):
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            where = f"messages.{i}.content.{j}"
            if part.type in NON_TEXT_PARTS:
                raise APIError(400, f"{where}: a content part of type {part.type!r}: this model reads text only "
                                    "(fix: send the content as text parts)", param=f"{where}.type",
                               code="unsupported_content")
            if part.type != "text":
                raise APIError(400, f"{where}.type: content parts of type {part.type!r} are not supported (fix: "
                                    "send 'text' parts)", param=f"{where}.type")
            if part.text is None:
                raise APIError(400, f"{where}.text: a text part needs its text", param=f"{where}.text")
        called.update(call.id for call in m.tool_calls or [] if call.id)
        if m.role == "tool":
            if not m.tool_call_id:
                raise APIError(400, f"messages.{i}.tool_call_id: a tool message needs the id of the tool call it "
                                    "answers", param=f"messages.{i}.tool_call_id")
            if m.tool_call_id not in called:
                raise APIError(400, f"messages.{i}.tool_call_id: {m.tool_call_id!r} answers no tool call of an "
                                    "earlier assistant message", param=f"messages.{i}.tool_call_id")


def _grammar(body: ChatCompletionRequest, messages: list[dict]) -> tuple[str, str] | None:
    """(grammar, the field asking for it) when a forced tool call (tool_choice required or named) or
    a JSON response_format holds the reply to a grammar; such replies are answered without thinking
    (see engine/constrained.py)."""
    schemas = {t.function.name: t.function.parameters or {"type": "object"} for t in body.tools or []}
    choice, fmt = body.tool_choice, body.response_format
    if isinstance(choice, NamedToolChoice):
        name = choice.function.get("name")
        if name not in schemas:
            raise APIError(400, f"tool_choice names the function {name!r}, which is not in tools",
                           param="tool_choice")
        grammar, param = tool_call_grammar({name: schemas[name]}, next_call_index(messages)), "tool_choice"
    elif choice == "required":
        if not schemas:
            raise APIError(400, "tool_choice required needs at least one tool", param="tool_choice")
        grammar, param = tool_call_grammar(schemas, next_call_index(messages)), "tool_choice"
    elif fmt is not None and fmt.type != "text":
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema else None
        grammar, param = json_grammar(schema), "response_format"
    else:
        return None
    return grammar, param


def _sampling(body: Sampling, max_tokens: int | None) -> list[SamplingParams]:
    """One SamplingParams per choice; choice i draws from seed + i, so `n` choices differ and a
    repeated request with the same seed gets the same choices."""
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return [SamplingParams(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        seed=None if body.seed is None else body.seed + i, max_tokens=max_tokens, stop=stop,
        stop_token_ids=list(body.stop_token_ids or []), presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, logprobs=body.logprob_count()) for i in range(body.n)]


def _prompt_ids(s: Serving, prompt) -> list[list[int]]:
    """A completion request's prompts as ids: text, texts, ids, or lists of ids."""
    if isinstance(prompt, str):
        prompts = [s.tokenizer.encode(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [s.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    vocab = s.tokenizer.vocab_size
    if not prompts or any(t < 0 or t >= vocab for p in prompts for t in p):
        raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
    return prompts


def _delta(event: ReplyEvent) -> Delta | None:
    if isinstance(event, ReasoningDelta):
        return Delta(reasoning_content=event.reasoning, reasoning=event.reasoning)
    if isinstance(event, TextDelta):
        return Delta(content=event.text)
    if isinstance(event, ToolCallStart):
        return Delta(tool_calls=[ToolCallOut(index=event.index, id=event.id, type="function",
                                             function=FunctionCallOut(name=event.name))])
    if isinstance(event, ToolCallArgs):
        return Delta(tool_calls=[ToolCallOut(index=event.index, function=FunctionCallOut(arguments=event.text))])
    return None


def _add(message: AssistantMessage, event: ReplyEvent) -> None:
    if isinstance(event, ReasoningDelta):
        message.reasoning_content = message.reasoning = (message.reasoning_content or "") + event.reasoning
    elif isinstance(event, TextDelta):
        message.content = (message.content or "") + event.text
    elif isinstance(event, ToolCallStart):
        message.tool_calls = (message.tool_calls or []) + [
            ToolCallOut(id=event.id, type="function", function=FunctionCallOut(name=event.name))]
    elif isinstance(event, ToolCallArgs):
        message.tool_calls[event.index].function.arguments += event.text


def _usage(finals: list[RequestOutput], parsers: list[ReplyParser]) -> Usage:
    """Usage of n choices of one prompt: the prompt counted once."""
    return _make_usage(finals[0].num_prompt_tokens, max(o.num_cached_tokens for o in finals),
                       sum(o.num_output_tokens for o in finals), sum(p.reasoning_tokens for p in parsers))


def _make_usage(prompt: int, cached: int, completion: int, reasoning: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
                 completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reasoning))


async def _merge(streams: list[AsyncIterator[RequestOutput]]) -> Outputs:
    """Outputs of several generations as they come, tagged with their index. Closing this stops
    (and so aborts) every one of them."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, end))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is end:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
