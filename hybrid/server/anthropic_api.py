"""Anthropic's Messages API: POST /v1/messages (streamed or not) and /v1/messages/count_tokens, what
Claude Code, Cline and other Anthropic clients send when pointed at this server.

The same endpoints are served under /anthropic too (/anthropic/v1/messages ...), as Moonshot serves
its Anthropic API, so a client set up for `https://api.moonshot.ai/anthropic` needs only its base
URL changed. Any model name is served (clients name Claude models unless told otherwise). Errors
on these paths take Anthropic's shape. Thinking is off unless the request turns it on (Anthropic's
default; the OpenAI endpoint follows Moonshot's, on).

A stream sends a ping whenever the model is silent for PING_SECONDS, message_start with the first
output (the prompt is read by then, so its usage already splits the prompt into input_tokens and
cache_read_input_tokens, as every later event does), the content blocks, message_delta with the
cumulative usage, and message_stop.
"""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, FastAPI, Request, Response

from hybrid.engine import RequestOutput, SamplingParams
from hybrid.server.anthropic_blocks import ContentBlocks
from hybrid.server.anthropic_prompt import read_conversation
from hybrid.server.anthropic_schema import (CountTokensRequest, CountTokensResponse, MessageResponse,
                                            MessagesRequest, Usage)
from hybrid.server.errors import APIError, register_error_format
from hybrid.server.reply import ReplyParser
from hybrid.server.serving import Serving, until_disconnected, with_silences
from hybrid.server.sse import sse, sse_response
from hybrid.server.thinking_signature import ThinkingSigner
from hybrid.server.tool_ids import reply_tool_ids
from hybrid.tokenizer.specials import find_marker

PING_SECONDS = 10.0
PREFIX = "/v1/messages"
MOUNTS = ("", "/anthropic")  # the API's paths, as is and under Moonshot's prefix
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
               529: "overloaded_error"}

router = APIRouter()


def install(app: FastAPI) -> None:
    """Add the endpoints (at each of MOUNTS), Anthropic's error shape on their paths, and the thinking
    signer."""
    for mount in MOUNTS:
        app.include_router(router, prefix=mount)
        register_error_format(app, mount or PREFIX, anthropic_error)
    app.state.thinking_signer = ThinkingSigner()


def anthropic_error(e: APIError) -> dict:
    kind = ERROR_TYPES.get(e.status, "api_error" if e.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.message}}


@router.post(PREFIX + "/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request) -> CountTokensResponse:
    conversation = read_conversation(body, request.app.state.thinking_signer)
    return CountTokensResponse(input_tokens=len(request.app.state.serving.conversation_prompt(conversation)))


@router.post(PREFIX)
async def messages(body: MessagesRequest, request: Request):
    arrival = time.monotonic()
    s: Serving = request.app.state.serving
    signer: ThinkingSigner = request.app.state.thinking_signer
    conversation = read_conversation(body, signer)
    prompt = s.conversation_prompt(conversation)
    s.check_prompt(prompt)
    params = SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                            max_tokens=body.max_tokens, stop=list(body.stop_sequences or []))
    s.constrain(params, conversation, len(prompt))
    parser = ReplyParser(s.tokenizer, prompt, parse_tools=bool(conversation.tools),
                         call_id=reply_tool_ids("toolu_", prompt))
    blocks = ContentBlocks(signer)
    outputs = s.generate(prompt, params, arrival)
    message_id = f"msg_{uuid.uuid4().hex}"

    def finish(last: RequestOutput, token_ids: list[int]) -> tuple[str, str | None, Usage]:
        stop_reason, stop_sequence = "end_turn", None
        if last.finish_reason == "length":
            stop_reason = "max_tokens"
        elif parser.num_tool_calls:
            stop_reason = "tool_use"
        elif params.stop and token_ids and token_ids[-1] not in s.tokenizer.eos_ids:
            hit = find_marker(s.tokenizer.decode(token_ids), tuple(x for x in params.stop if x))
            if hit is not None:
                stop_reason, stop_sequence = "stop_sequence", hit[1]
        return stop_reason, stop_sequence, _usage(last)

    if body.stream:
        async def stream() -> AsyncIterator[str]:
            token_ids: list[int] = []
            started = False
            try:
                async for out in with_silences(outputs, PING_SECONDS):
                    if out is None:
                        yield sse({"type": "ping"}, "ping")
                        continue
                    if not started:
                        start = MessageResponse(id=message_id, model=s.model_name, content=[], usage=_usage(out))
                        yield sse({"type": "message_start", "message": start.model_dump()}, "message_start")
                        started = True
                    token_ids += out.token_ids
                    for event in blocks.feed(parser.feed(out)):
                        yield sse(event, event["type"])
                    if out.finished:
                        for event in blocks.close():
                            yield sse(event, event["type"])
                        stop_reason, stop_sequence, usage = finish(out, token_ids)
                        yield sse({"type": "message_delta", "usage": usage.model_dump(),
                                   "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence}},
                                  "message_delta")
                        yield sse({"type": "message_stop"}, "message_stop")
            except APIError as e:
                yield sse(anthropic_error(e), "error")

        return sse_response(stream())

    token_ids: list[int] = []
    async for out in until_disconnected(request, outputs):
        token_ids += out.token_ids
        blocks.feed(parser.feed(out))
        last = out
    blocks.close()
    stop_reason, stop_sequence, usage = finish(last, token_ids)
    message = MessageResponse(id=message_id, model=s.model_name, content=[], stop_reason=stop_reason,
                              stop_sequence=stop_sequence, usage=usage)
    return Response(blocks.message_json(message.model_dump()), media_type="application/json")


def _usage(out: RequestOutput) -> Usage:
    """Usage so far: the prompt split into what was computed and what came from the prefix cache."""
    return Usage(input_tokens=out.num_prompt_tokens - out.num_cached_tokens,
                 cache_read_input_tokens=out.num_cached_tokens, output_tokens=out.num_output_tokens)
