"""OpenAI's Responses API on the real server (uvicorn on a loopback port, tiny model), through the
official openai SDK and raw HTTP: plain and streamed responses checked against the SDK's own types
and OpenAI's event order, the function-calling loop, previous_response_id and the store, reasoning
carried back, constrained decoding, a Codex-shaped request, and errors."""

import asyncio
import itertools
import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from hybrid.engine.constrained import OneToolCall
from hybrid.server import responses_api
from hybrid.server.errors import APIError
from hybrid.tokenizer.specials import (IM_END, THINK, THINK_END, TOOL_CALL_ARGS, TOOL_CALL_BEGIN, TOOL_CALL_END,
                                       TOOL_CALLS_BEGIN, TOOL_CALLS_END)

from conftest import KEY, sse_events, token_ids

HI = "Hello! What is the weather in Paris?"
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                          "unit": {"enum": ["C", "F"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}
CODEX = Path(__file__).parent / "fixtures" / "codex_request.json"
EVENTS = TypeAdapter(ResponseStreamEvent)
ITEM_EVENTS = {  # the events of an open item, by its type
    "reasoning": {"response.content_part.added", "response.reasoning_text.delta", "response.reasoning_text.done",
                  "response.content_part.done"},
    "message": {"response.content_part.added", "response.output_text.delta", "response.output_text.done",
                "response.content_part.done"},
    "function_call": {"response.function_call_arguments.delta", "response.function_call_arguments.done"}}


def post(server, body: dict, headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.url + "/v1/responses", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}", **(headers or {})})


def check_stream(events: list[dict]) -> Response:
    """Every event is one of the SDK's types, numbered in order; the stream runs created,
    in_progress, then items one at a time (added, their own events, done) at growing output
    indices, and ends with completed or incomplete, whose response holds the items as they were
    done. Returns that response."""
    for e in events:
        EVENTS.validate_python(e)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    done, open_item = [], None
    for e in events[2:-1]:
        if e["type"] == "response.in_progress":
            continue
        if e["type"] == "response.output_item.added":
            assert open_item is None and e["output_index"] == len(done)
            open_item = e["item"]
        elif e["type"] == "response.output_item.done":
            assert e["item"]["id"] == open_item["id"] and e["output_index"] == len(done)
            done.append(e["item"])
            open_item = None
        else:
            assert e["type"] in ITEM_EVENTS[open_item["type"]], e
            assert e["item_id"] == open_item["id"] and e["output_index"] == len(done)
    assert open_item is None and events[-1]["response"]["output"] == done
    return Response.model_validate(events[-1]["response"])


def test_plain_and_streamed_responses_agree_and_match_the_sdk_types(server, serving, engine):
    reply = token_ids(serving.tokenizer, "Let me think.", THINK_END, "Sunny.", IM_END)
    engine.script(reply)
    body = {"model": "tiny", "input": HI, "instructions": "Be brief.", "max_output_tokens": 40}
    r = post(server, body)
    assert r.status_code == 200, r.text
    plain = Response.model_validate(r.json())
    assert (plain.object, plain.status, plain.model) == ("response", "completed", "tiny")
    assert plain.instructions == "Be brief." and plain.id.startswith("resp_")
    assert [item.type for item in plain.output] == ["reasoning", "message"]
    assert plain.output[0].content[0].text == "Let me think." and plain.output[0].summary == []
    assert plain.output_text == "Sunny." and plain.output[1].status == "completed"
    prompt = serving.tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": HI}])
    assert engine.prompts[-1] == prompt
    usage = plain.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (len(prompt), len(reply),
                                                                             len(prompt) + len(reply))
    assert usage.output_tokens_details.reasoning_tokens == len(token_ids(serving.tokenizer, "Let me think.", THINK_END))

    r = post(server, {**body, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    final = check_stream(events)
    assert [kind for kind, _ in itertools.groupby(e["type"] for e in events)] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.reasoning_text.delta") == "Let me think."
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "Sunny."
    assert final.output_text == plain.output_text and final.id != plain.id
    assert final.usage.input_tokens_details.cached_tokens > 0  # the same prompt again


def test_the_sdk_stream_gives_typed_events_and_the_final_response(client, serving, engine):
    engine.script(token_ids(serving.tokenizer, "Hm.", THINK_END, "Hi there.", IM_END))
    with client.responses.stream(model="tiny", input=HI, max_output_tokens=40) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Hm."
    assert final.output_text == "Hi there." and final.status == "completed"


def test_a_reply_cut_short_is_incomplete(client, server, serving, engine):
    engine.script(token_ids(serving.tokenizer, THINK_END, "A long answer that goes on and on.", IM_END))
    r = client.responses.create(model="tiny", input=HI, max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and [(i.type, i.status) for i in r.output] == [("message", "incomplete")]
    events = sse_events(post(server, {"input": HI, "max_output_tokens": 3, "stream": True}).text)
    assert check_stream(events).status == "incomplete" and events[-1]["type"] == "response.incomplete"


def test_two_step_function_calling_loop(client, server, serving, engine):
    tok = serving.tokenizer
    engine.script(token_ids(tok, "I should call it.", TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN, "functions.get_weather:0",
                            TOOL_CALL_ARGS, '{"city": "Paris", "unit": "C"}', TOOL_CALL_END, TOOL_CALLS_END, IM_END))
    first = client.responses.create(model="tiny", input=HI, tools=[WEATHER], max_output_tokens=60)
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    call = first.output[1]
    assert (call.name, call.status, json.loads(call.arguments)) == ("get_weather", "completed",
                                                                    {"city": "Paris", "unit": "C"})
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    events = sse_events(post(server, {"input": HI, "tools": [WEATHER], "max_output_tokens": 60, "stream": True}).text)
    check_stream(events)
    args = [e for e in events if e["type"].startswith("response.function_call_arguments")]
    assert "".join(e["delta"] for e in args[:-1]) == args[-1]["arguments"] == call.arguments
    assert args[-1]["type"] == "response.function_call_arguments.done"
    assert next(e for e in events if e["type"] == "response.output_item.added" and e["item"]["type"] ==
                "function_call")["item"]["call_id"] == call.call_id  # the same conversation, the same id

    engine.script(token_ids(tok, "It is mild.", THINK_END, "18C and sunny in Paris.", IM_END))
    history = [{"role": "user", "content": HI}, *[item.model_dump(exclude_none=True) for item in first.output],
               {"type": "function_call_output", "call_id": call.call_id, "output": "18C, sunny"}]
    second = client.responses.create(model="tiny", input=history, tools=[WEATHER], max_output_tokens=60)
    assert second.output_text == "18C and sunny in Paris."
    text = tok.decode(engine.prompts[-1])
    assert "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>" in text
    assert "## Return of functions.get_weather:0\n18C, sunny" in text
    assert "<think>I should call it.</think>" in text  # reasoning stays within the tool-call loop


def test_previous_response_id_continues_a_stored_conversation(client, serving, engine):
    tok = serving.tokenizer
    engine.script(token_ids(tok, "Easy.", THINK_END, "Four.", IM_END))
    first = client.responses.create(model="tiny", input="What is 2 + 2?", instructions="Answer in one word.",
                                    max_output_tokens=20)
    engine.script(token_ids(tok, "Again.", THINK_END, "Six.", IM_END))
    second = client.responses.create(model="tiny", input="And 3 + 3?", previous_response_id=first.id,
                                     max_output_tokens=20)
    assert second.previous_response_id == first.id and second.instructions is None
    assert engine.prompts[-1] == tok.apply_chat_template([  # instructions are not carried over
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "Four.", "reasoning_content": "Easy."},
        {"role": "user", "content": "And 3 + 3?"}])
    third = client.responses.create(model="tiny", input="And 4 + 4?", previous_response_id=second.id,
                                    max_output_tokens=20, store=False)
    assert tok.decode(engine.prompts[-1]).count("<|im_user|>") == 3
    assert third.usage.input_tokens_details.cached_tokens >= second.usage.input_tokens - 16  # a page at most

    assert client.responses.retrieve(first.id).output_text == "Four."
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.retrieve(third.id)  # store: false
    assert e.value.body["code"] == "response_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="tiny", input="More?", previous_response_id=third.id)
    assert e.value.body["param"] == "previous_response_id"
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as e:  # its continuation lost its first turn
        client.responses.create(model="tiny", input="More?", previous_response_id=second.id)
    assert first.id in e.value.message and "no longer stored" in e.value.message


def test_reasoning_items_are_carried_back_with_kimis_preserve_semantics(client, serving, engine):
    tok = serving.tokenizer
    history = [{"role": "user", "content": "Hi"},
               {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text",
                                                                             "text": "Greet back."}]},
               {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
               {"role": "user", "content": "Bye"}]
    client.responses.create(model="tiny", input=history, max_output_tokens=2)
    assert "Greet back." not in tok.decode(engine.prompts[-1])  # a finished turn's reasoning is dropped...
    client.responses.create(model="tiny", input=history, max_output_tokens=2,
                            extra_body={"thinking": {"type": "enabled", "preserve": True}})
    assert "<think>Greet back.</think>Hello!" in tok.decode(engine.prompts[-1])  # ...unless preserved
    summary_only = [history[0], {"type": "reasoning", "summary": [{"type": "summary_text", "text": "A summary."}]},
                    {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "ok"}]}]
    client.responses.create(model="tiny", input=summary_only, tools=[WEATHER], max_output_tokens=2)
    assert "<think>A summary.</think><|tool_calls_section_begin|>" in tok.decode(engine.prompts[-1])


def test_reasoning_effort_and_parallel_tool_calls(client, serving, engine):
    tok = serving.tokenizer
    client.responses.create(model="tiny", input=HI, max_output_tokens=2, reasoning={"effort": "none"})
    assert engine.prompts[-1][-2:] == token_ids(tok, THINK, THINK_END)
    client.responses.create(model="tiny", input=HI, max_output_tokens=2, reasoning={"effort": "high"})
    assert engine.prompts[-1][-1] == tok.think_start_id
    client.responses.create(model="tiny", input=HI, max_output_tokens=2, tools=[WEATHER], parallel_tool_calls=False)
    assert any(isinstance(p, OneToolCall) for p in engine.params[-1].logits_processors)
    one = OneToolCall(tok)
    logits = torch.zeros(tok.vocab_size)
    assert int(one(token_ids(tok, TOOL_CALL_END), logits.clone()).argmax()) == tok.special[TOOL_CALLS_END]
    assert torch.equal(one(token_ids(tok, "x"), logits.clone()), logits)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_weather"},
                                         {"type": "allowed_tools", "mode": "required",
                                          "tools": [{"type": "function", "name": "get_weather"}]}])
def test_a_forced_call_is_one_valid_call(client, serving, engine, tool_choice):
    other = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
    tools = [WEATHER] if tool_choice == "required" else [WEATHER, other]
    r = client.responses.create(model="tiny", input=HI, tools=tools, tool_choice=tool_choice, max_output_tokens=40)
    [call] = r.output
    assert call.type == "function_call" and call.name == "get_weather" and r.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert engine.prompts[-1][-2:] == token_ids(serving.tokenizer, THINK, THINK_END)  # no thinking before it


def test_structured_text_follows_its_schema(client):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}}, "required": ["answer"],
              "additionalProperties": False}
    r = client.responses.create(model="tiny", input=HI, max_output_tokens=40, text={
        "format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


def test_namespaced_tools_are_offered_and_called_by_namespace(client, serving, engine):
    tok = serving.tokenizer
    agents = {"type": "namespace", "name": "agents", "description": "Sub-agents.",
              "tools": [{"type": "function", "name": "close", "description": "Close one.",
                         "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}]}
    engine.script(token_ids(tok, THINK_END, TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN, "functions.agents.close:0",
                            TOOL_CALL_ARGS, '{"id": "a1"}', TOOL_CALL_END, TOOL_CALLS_END, IM_END))
    r = client.responses.create(model="tiny", input=HI, tools=[agents], max_output_tokens=40)
    [call] = r.output
    assert (call.namespace, call.name, call.arguments) == ("agents", "close", '{"id": "a1"}')
    assert '"name":"agents.close"' in tok.decode(engine.prompts[-1])
    engine.script(token_ids(tok, THINK_END, "Closed.", IM_END))
    r = client.responses.create(model="tiny", tools=[agents], max_output_tokens=40, input=[
        {"role": "user", "content": HI}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "closed"}])
    assert "<|tool_call_begin|>functions.agents.close:0" in tok.decode(engine.prompts[-1])
    assert r.output_text == "Closed."


def test_codex_request_is_accepted(server, serving, engine):
    """Codex CLI 0.171.0's second request of a session (`codex exec resume`) as it sent it, its
    texts cut to 1,500 characters and its tools to three: developer and user messages, the first
    turn's reasoning item and answer, a namespace of tools, store false, reasoning.summary, include
    reasoning.encrypted_content, prompt_cache_key and client_metadata, streamed."""
    body = json.loads(CODEX.read_text())
    body["max_output_tokens"] = 8
    headers = {"originator": "codex_exec", "x-codex-beta-features": "remote_compaction_v2",
               "session-id": body["prompt_cache_key"], "accept": "text/event-stream"}
    r = post(server, body, headers)
    assert r.status_code == 200, r.text
    final = check_stream(sse_events(r.text))
    assert final.store is False and final.usage.input_tokens == len(engine.prompts[-1])
    text = serving.tokenizer.decode(engine.prompts[-1])
    assert text.startswith("<|im_system|>tool_declare<|im_middle|>") and '"name":"multi_agent_v1.close_agent"' in text
    assert "<|im_system|>system<|im_middle|>You are a coding agent running in the Codex CLI" in text
    assert "Hello there!<|im_end|><|im_user|>user<|im_middle|>And once more" in text
    kept = httpx.get(server.url + "/v1/responses/" + final.id, headers={"Authorization": f"Bearer {KEY}"})
    assert kept.status_code == 404  # store: false


def test_a_silent_model_keeps_the_stream_alive_and_a_failure_ends_it(server, serving, monkeypatch):
    generate = serving.generate

    async def slow_then_broken(prompt_ids, params, arrival=None):
        await asyncio.sleep(0.3)
        outputs = generate(prompt_ids, params, arrival)
        async for out in outputs:
            yield out
            await outputs.aclose()
            raise APIError(500, "internal error: the engine failed")

    monkeypatch.setattr(responses_api, "KEEPALIVE_SECONDS", 0.05)
    monkeypatch.setattr(serving, "generate", slow_then_broken)
    events = sse_events(post(server, {"input": HI, "max_output_tokens": 8, "stream": True}).text)
    for e in events:
        EVENTS.validate_python(e)
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds.count("response.in_progress") > 2
    assert kinds[-2:] == ["error", "response.failed"]
    assert events[-2]["message"] == "internal error: the engine failed" and events[-2]["code"] == "server_error"
    failed = Response.model_validate(events[-1]["response"])
    assert failed.status == "failed" and failed.error.code == "server_error"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


def test_output_text_logprobs(client, server, sampled):
    body = {"input": HI, "max_output_tokens": 6, "include": ["message.output_text.logprobs"], "top_logprobs": 2,
            "temperature": 0, "thinking": {"type": "disabled"}}
    r = client.responses.create(model="tiny", **{k: v for k, v in body.items() if k != "thinking"},
                                extra_body={"thinking": body["thinking"]})
    entries = r.output[0].content[0].logprobs
    assert len(entries) == r.usage.output_tokens == len(sampled) == 6
    for entry, (logits, token) in zip(entries, sampled):
        logprobs = logits.log_softmax(-1)
        assert abs(entry.logprob - logprobs[token].item()) < 1e-4
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(logprobs.topk(2).values.tolist(), abs=1e-4)
    events = sse_events(post(server, {**body, "stream": True}).text)
    sent = [entry for e in events if e["type"] == "response.output_text.delta" for entry in e["logprobs"]]
    done = check_stream(events).output[0].content[0].logprobs
    assert len(done) == 6 and [e.model_dump() for e in done[:len(sent)]] == sent
    plain = client.responses.create(model="tiny", input=HI, max_output_tokens=2, temperature=0,
                                    extra_body={"thinking": body["thinking"]})
    assert plain.output[0].content[0].logprobs == []  # not asked


@pytest.mark.parametrize("body, status, param, words", [
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, 400, "input.0.type", "web_search_call"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input.0.type", "item_reference"),
    ({"input": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400, "input.0.content.0.type", "input_audio"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                             {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}]}]},
     400, "input.0.content.1.type", "reads text only"),
    ({"input": HI, "tools": [{"type": "web_search"}]}, 400, "tools.0.type", "web_search = \"disabled\""),
    ({"input": HI, "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, 400, "tools.0.type",
     "file search"),
    ({"input": HI, "tools": [{"type": "computer_use_preview", "display_width": 1, "display_height": 1,
                              "environment": "linux"}]}, 400, "tools.0.type", "computer use"),
    ({"input": HI, "tools": [{"type": "custom", "name": "apply_patch"}]}, 400, "tools.0.type",
     "function and namespace"),
    ({"input": HI, "tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}}, 400, "tool_choice.type",
     "built-in"),
    ({"input": HI, "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice.name", "nope"),
    ({"input": HI, "tools": [{**WEATHER, "parameters": {"type": "array"}}]}, 400, "tools.0.parameters", "object"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, 400, "input.0.call_id",
     "call_x"),
    ({"input": HI, "previous_response_id": "resp_nope"}, 404, "previous_response_id", "resp_nope"),
    ({"input": HI, "background": True}, 400, "background", "background"),
    ({"input": HI, "max_output_tokens": 0}, 400, "max_output_tokens", "max_output_tokens"),
    ({"input": HI, "model": "gpt-9"}, 404, "model", "gpt-9"),
    ({"input": [{"type": "function_call", "name": "f"}]}, 400, "input.0.function_call.call_id", "call_id"),
])
def test_bad_requests_get_openai_errors(server, client, body, status, param, words):
    r = post(server, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and words in error["message"]
    assert error["param"] == param
    assert client.models.list().data  # still serving
