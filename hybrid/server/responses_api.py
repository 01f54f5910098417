"""OpenAI's Responses API: POST /v1/responses (streamed or not), GET and DELETE /v1/responses/{id};
what OpenAI's Codex CLI and the newer OpenAI SDK features speak.

A request is read into the conversation the chat template renders (responses_input.py) and runs on
the same engine, parsers and constrained decoding as chat completions; the reply becomes output
items (responses_output.py). A stream opens with `response.created` and `response.in_progress`,
repeats `response.in_progress` whenever the model is silent for KEEPALIVE_SECONDS (reading a long
prompt: clients give up on a silent stream), and ends with `response.completed`, or
`response.incomplete` when `max_output_tokens` (or the context) cut the reply short; a failure
midway sends `error` and then `response.failed`. Every event carries its `sequence_number`.
Responses are kept (response_store.py) unless `store` is false.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, FastAPI, Request

from hybrid.engine import RequestOutput, SamplingParams
from hybrid.server.errors import APIError, openai_error
from hybrid.server.logprobs import Logprobs
from hybrid.server.reply import ReplyParser
from hybrid.server.response_store import ResponseStore, StoredResponse
from hybrid.server.responses_input import read_request
from hybrid.server.responses_output import OutputItems
from hybrid.server.responses_schema import ResponseObject, ResponsesRequest, ResponseUsage
from hybrid.server.serving import Serving, until_disconnected, with_silences
from hybrid.server.sse import sse, sse_response
from hybrid.server.tool_ids import reply_tool_ids

KEEPALIVE_SECONDS = 10.0
PREFIX = "/v1/responses"

router = APIRouter()


def install(app: FastAPI, store: ResponseStore | None = None) -> None:
    app.include_router(router)
    app.state.response_store = store or ResponseStore()


@router.post(PREFIX)
async def create_response(body: ResponsesRequest, request: Request):
    arrival = time.monotonic()
    s: Serving = request.app.state.serving
    store: ResponseStore = request.app.state.response_store
    if body.model is not None:
        s.check_model(body.model)
    history = store.history(body.previous_response_id) if body.previous_response_id else []
    read = read_request(body, history)
    prompt = s.conversation_prompt(read.conversation)
    s.check_prompt(prompt, "input")
    params = SamplingParams(temperature=1.0 if body.temperature is None else body.temperature,
                            top_p=body.top_p or 1.0, max_tokens=body.max_output_tokens, logprobs=read.logprobs)
    s.constrain(params, read.conversation, len(prompt))
    parser = ReplyParser(s.tokenizer, prompt, parse_tools=bool(read.conversation.tools),
                         call_id=reply_tool_ids("call_", prompt))
    items = OutputItems(read.names)
    logprobs = Logprobs(s.tokenizer)
    outputs = s.generate(prompt, params, arrival)
    response = _echo(body, s.model_name)

    def feed(out: RequestOutput) -> list[dict]:
        return items.feed(parser.feed(out), logprobs.entries(out))

    def finish(last: RequestOutput) -> tuple[list[dict], ResponseObject]:
        """The events that close the output, and the finished response (kept when asked)."""
        cut = last.finish_reason == "length"
        events = items.close("incomplete" if cut else "completed")
        done = response.model_copy(update=dict(
            status="incomplete" if cut else "completed", completed_at=int(time.time()), output=items.items,
            incomplete_details={"reason": "max_output_tokens"} if cut else None,
            usage=ResponseUsage(input_tokens=last.num_prompt_tokens, output_tokens=last.num_output_tokens,
                                total_tokens=last.num_prompt_tokens + last.num_output_tokens,
                                input_tokens_details={"cached_tokens": last.num_cached_tokens},
                                output_tokens_details={"reasoning_tokens": parser.reasoning_tokens})))
        if body.store:
            store.put(StoredResponse(done.model_dump(), read.turn + [items.assistant_message()],
                                     body.previous_response_id))
        return events, done

    if body.stream:
        async def stream() -> AsyncIterator[str]:
            numbers = itertools.count()

            def event(data: dict) -> str:
                return sse({**data, "sequence_number": next(numbers)}, data["type"])

            yield event({"type": "response.created", "response": response.model_dump()})
            yield event({"type": "response.in_progress", "response": response.model_dump()})
            try:
                async for out in with_silences(outputs, KEEPALIVE_SECONDS):
                    if out is None:
                        yield event({"type": "response.in_progress", "response": response.model_dump()})
                        continue
                    for data in feed(out):
                        yield event(data)
                    if out.finished:
                        events, done = finish(out)
                        for data in events:
                            yield event(data)
                        yield event({"type": f"response.{done.status}", "response": done.model_dump()})
            except APIError as e:
                error = openai_error(e)["error"]
                yield event({"type": "error", "code": error["code"] or error["type"], "message": e.message,
                             "param": e.param})
                failed = response.model_copy(update=dict(status="failed", output=items.items, error={
                    "code": "server_error", "message": e.message}))
                yield event({"type": "response.failed", "response": failed.model_dump()})

        return sse_response(stream())

    last = None
    async for out in until_disconnected(request, outputs):
        feed(out)
        last = out
    return finish(last)[1]


@router.get(PREFIX + "/{response_id}")
async def get_response(response_id: str, request: Request, stream: bool = False):
    if stream:
        raise APIError(400, "stored responses are returned whole; streaming them again is not supported",
                       param="stream")
    return request.app.state.response_store.get(response_id).response


@router.delete(PREFIX + "/{response_id}")
async def delete_response(response_id: str, request: Request):
    store: ResponseStore = request.app.state.response_store
    store.get(response_id)
    store.delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


def _echo(body: ResponsesRequest, model: str) -> ResponseObject:
    """The response in progress: its id and the request's settings, as OpenAI echoes them."""
    tool_choice = body.tool_choice if isinstance(body.tool_choice, str) else body.tool_choice.model_dump()
    text = body.text.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else None
    return ResponseObject(
        id=f"resp_{uuid.uuid4().hex}", created_at=int(time.time()), model=model, instructions=body.instructions,
        max_output_tokens=body.max_output_tokens, parallel_tool_calls=body.parallel_tool_calls,
        previous_response_id=body.previous_response_id, store=body.store,
        reasoning=body.reasoning.model_dump(exclude_none=True) if body.reasoning else {},
        temperature=body.temperature, top_p=body.top_p, top_logprobs=body.top_logprobs,
        tool_choice=tool_choice, tools=[t.model_dump(exclude_none=True) for t in body.tools],
        truncation=body.truncation or "disabled", user=body.user, metadata=body.metadata or {},
        **({"text": text} if text else {}))
