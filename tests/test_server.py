"""The real server (uvicorn on a free loopback port, tiny model) through the official openai SDK
and raw HTTP: chat and completions, streaming, tools, reasoning, usage, concurrency, cancellation,
the prefix cache, and every kind of bad request."""

import asyncio
import json
import re
import time

import httpx
import openai
import pytest
import torch

from hybrid.engine import EngineConfig
from hybrid.engine.constrained import OneToolCall
from hybrid.server.metrics import Metrics
from hybrid.server.serving import Serving
from hybrid.tokenizer.specials import (IM_END, THINK_END, TOOL_CALL_ARGS, TOOL_CALL_BEGIN, TOOL_CALL_END,
                                       TOOL_CALLS_BEGIN, TOOL_CALLS_END)

from conftest import HI, KEY, token_ids

KV_TOKENS = 4096
IMAGE_QUESTION = {"type": "text", "text": "What is in this picture?"}
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                             "parameters": {"type": "object",
                                                            "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def serving(tiny_dir):
    return Serving.load(tiny_dir, dtype=torch.float32, config=EngineConfig(kv_cache_tokens=KV_TOKENS))


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return float(re.search(rf"^hybrid_{name} (\S+)$", text, re.M).group(1))


def test_models_and_health(client, server):
    [card] = client.models.list().data
    assert (card.id, card.object, card.owned_by) == ("tiny", "model", "hybrid") and card.created > 0
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed


def test_api_key_guards_every_endpoint_but_health(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=HI)
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/v1/models", headers={"x-api-key": KEY}).status_code == 200


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_plain_and_streamed_agree_with_the_tokenizer_counts(client, serving, thinking):
    kw = dict(model="tiny", messages=HI, max_tokens=16, temperature=0,
              extra_body={"thinking": {"type": "enabled" if thinking else "disabled"}})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    msg = full.choices[0].message
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    text = "".join(d.content or "" for d in deltas)
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert (text, reasoning) == (msg.content or "", getattr(msg, "reasoning_content", None) or "")
    assert (reasoning != "") == thinking
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (
        full.usage.prompt_tokens, full.usage.completion_tokens)
    assert usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again
    prompt = serving.tokenizer.apply_chat_template(HI, thinking=thinking)
    assert full.usage.prompt_tokens == len(prompt)
    assert full.usage.completion_tokens == 16 or full.choices[0].finish_reason == "stop"


def test_openai_endpoint_preserves_thinking_only_when_asked(client, serving, engine):
    history = HI + [{"role": "assistant", "content": "Sunny.", "reasoning_content": "Let me think."},
                    {"role": "user", "content": "And tomorrow?"}]
    for preserve in (False, True):
        client.chat.completions.create(model="tiny", messages=history, max_tokens=2,
                                       extra_body={"thinking": {"type": "enabled", "preserve": preserve}})
        assert ("Let me think." in serving.tokenizer.decode(engine.prompts[-1])) == preserve


def test_usage_counts_the_scripted_reply_and_its_reasoning(client, serving, engine):
    tok = serving.tokenizer
    reply = token_ids(tok, "Let me think.", THINK_END, "Sunny.", IM_END)
    engine.script(reply)
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=50)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.reasoning, msg.content) == ("Let me think.", "Let me think.", "Sunny.")
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(reply)
    assert r.usage.completion_tokens_details.reasoning_tokens == len(token_ids(tok, "Let me think.", THINK_END))
    assert r.usage.prompt_tokens == len(tok.apply_chat_template(HI))


def test_streamed_tool_calls(client, serving, engine):
    engine.script(token_ids(serving.tokenizer, THINK_END, TOOL_CALLS_BEGIN, TOOL_CALL_BEGIN, "functions.get_weather:0",
                            TOOL_CALL_ARGS, '{"city": "Paris"}', TOOL_CALL_END, TOOL_CALLS_END, IM_END))
    chunks = list(client.chat.completions.create(model="tiny", messages=HI, tools=WEATHER, stream=True,
                                                 max_tokens=50))
    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first = calls[0][0]
    assert (first.index, first.id[:5], first.type, first.function.name) == (0, "call_", "function", "get_weather")
    assert "".join(c[0].function.arguments or "" for c in calls) == '{"city": "Paris"}'
    assert all(c[0].index == 0 and c[0].id is None for c in calls[1:])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    full = client.chat.completions.create(model="tiny", messages=HI, tools=WEATHER, tool_choice="auto", max_tokens=50)
    [call] = full.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris"} and full.choices[0].finish_reason == "tool_calls"
    assert call.id == first.id  # the same conversation, the same id


def test_parallel_tool_calls_false_closes_the_section_after_one_call(client, engine):
    client.chat.completions.create(model="tiny", messages=HI, tools=WEATHER, max_tokens=2)
    assert not any(isinstance(p, OneToolCall) for p in engine.params[-1].logits_processors)
    client.chat.completions.create(model="tiny", messages=HI, tools=WEATHER, max_tokens=2, parallel_tool_calls=False)
    assert any(isinstance(p, OneToolCall) for p in engine.params[-1].logits_processors)


def test_tool_history_with_client_ids_is_accepted(client):
    history = HI + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "18C, sunny"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=WEATHER, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_client_tool_ids_become_kimis_numbered_over_the_conversation(client, serving, engine, monkeypatch):
    """Kimi numbers calls `functions.{name}:{idx}` over the whole conversation (FACTS.md §4): two
    calls in one turn, their results sent back in the other order, a client id reused by a later
    turn, and a forced call after all of them, which must be number 3."""
    def call(call_id, city):
        return {"id": call_id, "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
    history = HI + [
        {"role": "assistant", "content": None, "tool_calls": [call("call_x7", "Paris"), call("call_y8", "Oslo")]},
        {"role": "tool", "tool_call_id": "call_y8", "content": "5C"},
        {"role": "tool", "tool_call_id": "call_x7", "content": "18C"},
        {"role": "user", "content": "And Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [call("call_x7", "Rome")]},
        {"role": "tool", "tool_call_id": "call_x7", "content": "25C"}]
    replies = []
    generate = serving.generate

    async def recording(prompt_ids, params, arrival=None):
        async for out in generate(prompt_ids, params, arrival):
            replies.extend(out.token_ids)
            yield out

    monkeypatch.setattr(serving, "generate", recording)
    r = client.chat.completions.create(model="tiny", messages=history, tools=WEATHER, max_tokens=64,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    prompt = serving.tokenizer.decode(engine.prompts[-1])
    assert re.findall(r"<\|tool_call_begin\|>(.*?)<\|tool_call_argument_begin\|>(.*?)<\|tool_call_end\|>", prompt) == [
        ("functions.get_weather:0", '{"city": "Paris"}'), ("functions.get_weather:1", '{"city": "Oslo"}'),
        ("functions.get_weather:2", '{"city": "Rome"}')]
    assert re.findall(r"## Return of (\S+)\n(\w+)", prompt) == [
        ("functions.get_weather:1", "5C"), ("functions.get_weather:0", "18C"), ("functions.get_weather:2", "25C")]
    assert "call_x7" not in prompt and "call_y8" not in prompt
    reply = serving.tokenizer.decode(replies)
    assert reply.startswith(f"{TOOL_CALLS_BEGIN}{TOOL_CALL_BEGIN}functions.get_weather:3{TOOL_CALL_ARGS}"), reply
    [forced] = r.choices[0].message.tool_calls
    assert forced.id.startswith("call_") and forced.id not in ("call_x7", "call_y8")


def test_logprobs_are_those_of_the_logits_the_engine_sampled_from(client, serving, sampled):
    tok = serving.tokenizer
    kw = dict(model="tiny", messages=HI, max_tokens=6, temperature=0.8, seed=7, logprobs=True, top_logprobs=3,
              extra_body={"thinking": {"type": "disabled"}})
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    steps = sampled[:]
    stopped = r.choices[0].finish_reason == "stop"  # the stop token ends the reply and is not listed
    assert len(content) == len(steps) - stopped == r.usage.completion_tokens - stopped
    for entry, (logits, token) in zip(content, steps):
        logprobs = logits.log_softmax(-1)
        assert abs(entry.logprob - logprobs[token].item()) < 1e-4
        top = logprobs.topk(3)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
        assert [bytes(t.bytes) for t in entry.top_logprobs] == [tok.token_bytes(i) for i in top.indices.tolist()]
        assert bytes(entry.bytes) == tok.token_bytes(token)
    text = b"".join(bytes(e.bytes) for e in content if e.token not in tok.special)  # specials write no text
    assert text.decode(errors="replace") == r.choices[0].message.content

    chunks = list(client.chat.completions.create(**kw, stream=True))  # the same seed, the same tokens
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)  # prefix cached

    sampled.clear()
    c = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=4, temperature=0,
                                  logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(sampled) and "".join(t for t in lp.tokens if t not in tok.special) == c.choices[0].text
    for token_logprob, top, (logits, token) in zip(lp.token_logprobs, lp.top_logprobs, sampled):
        assert abs(token_logprob - logits.log_softmax(-1)[token].item()) < 1e-4
        assert token_logprob == pytest.approx(max(top.values()), abs=1e-4)  # greedy: the most likely one
    assert lp.text_offset == [len("".join(t for t in lp.tokens[:i] if t not in tok.special))
                              for i in range(len(lp.tokens))]


def test_n_choices_with_a_seed_are_reproducible(client):
    kw = dict(model="tiny", messages=HI, max_tokens=12, temperature=1.0, n=3, seed=1234)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    texts = lambda r: [(c.index, c.message.reasoning_content, c.message.content) for c in r.choices]
    assert texts(a) == texts(b) and [c.index for c in a.choices] == [0, 1, 2]
    assert len({t[1] for t in texts(a)}) > 1  # the choices differ from each other


def test_completions_plain_streamed_and_echo(client, serving):
    r = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == len(serving.tokenizer.encode("The capital of France is"))
    streamed = list(client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=8,
                                              temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    echo = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=2, echo=True)
    assert len(echo.choices) == 2 and echo.choices[0].text.startswith(serving.tokenizer.decode([5, 6, 7]))


def test_32_concurrent_streams_get_what_they_get_alone(server):
    prompts = [[{"role": "user", "content": f"Request {i}: " + "tell me more " * (i % 7)}] for i in range(32)]

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)

        async def one(messages):
            stream = await aclient.chat.completions.create(
                model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True,
                extra_body={"thinking": {"type": "disabled"}})
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        start = time.monotonic()
        together = await asyncio.gather(*(one(m) for m in prompts))
        took = time.monotonic() - start
        alone = [await one(m) for m in prompts]
        return together, alone, took

    together, alone, took = asyncio.run(main())
    assert together == alone
    assert took < 30


def test_a_client_that_leaves_mid_stream_frees_its_pages(client, server, serving, engine):
    engine.script(token_ids(serving.tokenizer, "a") * 2000)  # a reply that would not end by itself
    aborted = serving.metrics.value("requests_total", finish_reason="abort")
    before = metric(server, "kv_pages_used")
    stream = client.chat.completions.create(model="tiny", messages=HI, max_tokens=2000, stream=True)
    for _ in zip(range(5), stream):
        pass
    assert metric(server, "kv_pages_used") > before
    stream.close()
    deadline = time.monotonic() + 10
    while metric(server, "kv_pages_used") != before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert metric(server, "kv_pages_used") == before
    assert serving.metrics.value("requests_total", finish_reason="abort") == aborted + 1


def test_prompt_longer_than_the_cache_is_a_400_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * KV_TOKENS}])
    assert e.value.status_code == 400 and "context holds" in e.value.message
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=[1] * KV_TOKENS)
    assert client.chat.completions.create(model="tiny", messages=HI, max_tokens=2).choices


def test_second_turn_is_served_from_the_prefix_cache(client, server):
    question = [{"role": "user", "content": "Tell me a long story about a dragon and a knight. " * 4}]
    first = client.chat.completions.create(model="tiny", messages=question, max_tokens=8, temperature=0)
    hits = metric(server, "prefix_cache_hit_tokens_total")
    turn2 = question + [{"role": "assistant", "content": first.choices[0].message.content or ""},
                        {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="tiny", messages=turn2, max_tokens=8, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 16 and cached > 0
    assert metric(server, "prefix_cache_hit_tokens_total") == hits + cached


@pytest.mark.parametrize("body, status, param", [
    (b'{"model": "tiny", "messages": [', 400, None),
    (b'[1, 2]', 400, None),
    ({"model": "tiny", "messages": "hello"}, 400, "messages"),
    ({"model": "tiny", "messages": HI, "temperature": "hot"}, 400, "temperature"),
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": HI, "max_tokens": -5}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "gpt-9", "messages": HI}, 404, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "foo", "text": "x"}]}]}, 400,
     "messages.0.content.0.type"),
    ({"model": "tiny", "messages": [{"role": "user", "content": [IMAGE_QUESTION, IMAGE]}]}, 400,
     "messages.0.content.1.type"),
    ({"model": "tiny", "messages": HI + [{"role": "tool", "content": "18C"}]}, 400, "messages.1.tool_call_id"),
    ({"model": "tiny", "messages": HI + [{"role": "tool", "tool_call_id": "call_x", "content": "18C"}]}, 400,
     "messages.1.tool_call_id"),
    ({"model": "tiny", "messages": HI, "seed": 2**70}, 400, "seed"),
    ({"model": "tiny", "messages": HI, "top_k": 2**70}, 400, "top_k"),
    ({"model": "tiny", "messages": HI, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": "tiny", "messages": HI, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}, 413, None),
])
def test_bad_requests_get_openai_errors(server, client, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=content,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    assert client.models.list().data  # still serving


def test_refusals_say_what_to_change(client):
    """What OpenAI's API refuses is refused here too, with a message a client developer can act on;
    a non-text part is never silently dropped."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [IMAGE_QUESTION, IMAGE]}])
    assert "type 'image_url'" in e.value.message and "reads text only" in e.value.message
    assert e.value.body["code"] == "unsupported_content"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HI + [{"role": "tool", "content": "18C"}])
    assert "needs the id of the tool call it answers" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Hi", seed=2**64)
    assert e.value.body["param"] == "seed"
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [IMAGE_QUESTION]}],
                                       seed=2**63 - 1, n=2, temperature=1, max_tokens=2)
    assert len(r.choices) == 2  # the largest seed, plus the choice index, still works


def test_unknown_route_is_a_404_in_the_same_shape(server):
    r = httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_metrics_exposes_the_serving_figures(server, client, serving):
    client.chat.completions.create(model="tiny", messages=HI, max_tokens=3)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("requests_total", "prompt_tokens_total", "generation_tokens_total", "prefix_cache_hit_tokens_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_count", "kv_pages_used",
                 "kv_pages_total", "forward_seconds_total", "expert_wait_seconds_total"):
        assert f"hybrid_{name}" in text
    assert metric(server, "kv_pages_total") == KV_TOKENS // 16
    assert metric(server, "expert_wait_seconds_total") > 0 and metric(server, "forward_seconds_total") > 0
    ttft = r'^hybrid_time_to_first_token_seconds_bucket\{le="[^"]+"\} (\S+)$'
    buckets = [float(n) for n in re.findall(ttft, text, re.M)]
    assert buckets == sorted(buckets) and buckets[-1] == metric(server, "time_to_first_token_seconds_count") > 0
    other = Metrics(serving.thread.engine)  # a second server's metrics in this process: a registry of its own
    assert other.value("requests_total") == 0 < serving.metrics.value("requests_total")
    assert other.value("kv_pages_total") == KV_TOKENS // 16

