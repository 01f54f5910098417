"""Constrained decoding: the grammar processor on its own (a model that never wants to close still
finishes within max_tokens; the thinking budget), and on the real server with the random-weight
tiny model: forced tool calls over 50 random JSON schemas through both SDKs, and JSON-schema
answers, every one parsing and valid."""

import asyncio
import json
import random

import anthropic
import httpx
import jsonschema
import openai
import pytest
import torch

from hybrid.engine import EngineConfig
from hybrid.engine.constrained import ThinkingBudget, json_grammar, tool_call_grammar
from hybrid.engine.grammar import GrammarError, GrammarProcessor
from hybrid.server.app import create_app
from hybrid.server.http_server import ServerThread
from hybrid.server.serving import Serving
from hybrid.tokenizer import Tokenizer
from hybrid.tokenizer.specials import TOOL_CALL_ARGS, TOOL_CALL_END
from test_anthropic import check_events

KEY = "test-key"
N_SCHEMAS = 50
MAX_TOKENS = 160  # above every random schema's shortest valid call in the tiny vocabulary
ASK = [{"role": "user", "content": "Call the tool with sensible arguments."}]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """Nested objects and arrays, enums, required fields, strings and bounded numbers."""
    kind = rng.choice(["string", "integer", "number", "boolean", "enum"] + (["array", "object"] if depth < 2 else []))
    if kind == "string":
        return {"type": "string", **({"maxLength": rng.randint(1, 16)} if rng.random() < 0.5 else {})}
    if kind in ("integer", "number"):
        low = rng.randint(-100, 100)
        bounds = {"minimum": low, "maximum": low + rng.randint(0, 500)}
        return {"type": kind, **{k: v for k, v in bounds.items() if rng.random() < 0.6}}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 7, 2.5, None, True], rng.randint(1, 4))}
    if kind == "array":
        low = rng.randint(0, 2)
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": low,
                "maxItems": low + rng.randint(0, 3)}
    return _object(rng, depth)


def _object(rng: random.Random, depth: int) -> dict:
    props = {f"{rng.choice(['id', 'name', 'when', 'tags'])}_{i}": random_schema(rng, depth + 1)
             for i in range(rng.randint(1, 3))}
    return {"type": "object", "properties": props, "required": [p for p in props if rng.random() < 0.7]}


SCHEMAS = [_object(random.Random(seed), 0) for seed in range(N_SCHEMAS)]


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return Tokenizer.from_pretrained(tiny_dir)


@pytest.fixture(scope="module")
def server(tiny_dir):
    serving = Serving.load(tiny_dir, dtype=torch.float32, config=EngineConfig(kv_cache_tokens=65536))
    with ServerThread(create_app(serving, api_key=KEY)) as s:
        yield s


def arguments(text: str) -> dict:
    return json.loads(text.split(TOOL_CALL_ARGS, 1)[1].split(TOOL_CALL_END, 1)[0])


@pytest.mark.parametrize("seed", range(5))
def test_a_model_that_never_closes_still_finishes_in_budget(tokenizer, seed):
    """Logits that always prefer more of the same (letters in strings, digits, new items) reach a
    valid, complete call on exactly the budget."""
    schema = SCHEMAS[seed]
    budget = 120
    processor = GrammarProcessor(tokenizer, tool_call_grammar({"f": schema}, 3), budget)
    stubborn = torch.zeros(tokenizer.vocab_size)
    for ch, bonus in (("a", 9.0), ("7", 8.0), (",", 7.0), ("[", 6.0), ("{", 5.0)):
        stubborn[tokenizer.encode(ch)[0]] = bonus
    out: list[int] = []
    for _ in range(budget):
        out.append(int(processor(out, stubborn.clone()).argmax()))
        if out[-1] in tokenizer.eos_ids:
            break
    assert out[-1] in tokenizer.eos_ids, "no end within the budget"
    text = tokenizer.decode(out)
    assert text.startswith("<|tool_calls_section_begin|><|tool_call_begin|>functions.f:3<|tool_call_argument_begin|>")
    jsonschema.validate(arguments(text), schema)


def test_a_call_of_any_of_several_tools(tokenizer):
    tools = {"alpha": SCHEMAS[0], "beta": SCHEMAS[1]}
    processor = GrammarProcessor(tokenizer, tool_call_grammar(tools, 0), 200)
    gen = torch.Generator().manual_seed(0)
    out: list[int] = []
    for _ in range(200):
        logits = processor(out, torch.randn(tokenizer.vocab_size, generator=gen) * 3)
        out.append(int(torch.multinomial(logits.softmax(-1), 1, generator=gen)))
        if out[-1] in tokenizer.eos_ids:
            break
    assert out[-1] in tokenizer.eos_ids, "no end within the budget"
    name = tokenizer.decode(out).split("functions.", 1)[1].split(":", 1)[0]
    jsonschema.validate(arguments(tokenizer.decode(out)), tools[name])


def test_unenforceable_schema_is_an_error(tokenizer):
    with pytest.raises(GrammarError):
        GrammarProcessor(tokenizer, json_grammar({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}), 10)


def test_thinking_budget_forces_the_end_of_reasoning(tokenizer):
    budget = ThinkingBudget(tokenizer, 3)
    logits = torch.zeros(tokenizer.vocab_size)
    assert torch.equal(budget([5, 6], logits.clone()), logits)
    assert int(budget([5, 6, 7], logits.clone()).argmax()) == tokenizer.think_end_id
    assert torch.equal(budget([5, 6, 7, tokenizer.think_end_id, 8], logits.clone()), logits)  # over once closed


def test_forced_calls_and_json_answers_over_random_schemas_validate(server):
    """Each schema as a forced tool through Anthropic's SDK (streamed for half), as tool_choice
    required through OpenAI's, and as a structured JSON answer: all at once, batched."""
    claude = anthropic.AsyncAnthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=300)
    gpt = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=300)

    async def via_anthropic(i: int, schema: dict) -> dict:
        kw = dict(model="m", max_tokens=MAX_TOKENS, messages=ASK, tool_choice={"type": "tool", "name": f"tool_{i}"},
                  tools=[{"name": f"tool_{i}", "input_schema": schema}])
        if i % 2:
            async with claude.messages.stream(**kw) as s:
                check_events([e.model_dump() async for e in s])
                m = await s.get_final_message()
        else:
            m = await claude.messages.create(**kw)
        [block] = m.content
        assert (block.type, block.name, m.stop_reason) == ("tool_use", f"tool_{i}", "tool_use")
        return block.input

    async def via_openai(i: int, schema: dict) -> dict:
        r = await gpt.chat.completions.create(
            model="tiny", messages=ASK, max_tokens=MAX_TOKENS, tool_choice="required",
            tools=[{"type": "function", "function": {"name": f"tool_{i}", "parameters": schema}}])
        [call] = r.choices[0].message.tool_calls
        assert (call.function.name, r.choices[0].finish_reason) == (f"tool_{i}", "tool_calls")
        return json.loads(call.function.arguments)

    async def as_json(i: int, schema: dict) -> dict:
        """Through OpenAI's response_format for even i, Anthropic's output_config for odd."""
        if i % 2:
            m = await claude.messages.create(model="m", max_tokens=MAX_TOKENS, messages=ASK,
                                             output_config={"format": {"type": "json_schema", "schema": schema}})
            assert m.stop_reason == "end_turn" and [b.type for b in m.content] == ["text"]
            return json.loads(m.content[0].text)
        r = await gpt.chat.completions.create(
            model="tiny", messages=ASK, max_tokens=MAX_TOKENS,
            response_format={"type": "json_schema", "json_schema": {"name": f"answer_{i}", "schema": schema}})
        assert r.choices[0].finish_reason == "stop"
        return json.loads(r.choices[0].message.content)

    async def main():
        jobs = [(f, i, s) for i, s in enumerate(SCHEMAS) for f in (via_anthropic, via_openai, as_json)]
        return await asyncio.gather(*(f(i, s) for f, i, s in jobs)), jobs

    results, jobs = asyncio.run(main())
    for value, (_, i, schema) in zip(results, jobs):
        jsonschema.validate(value, schema)


def test_json_object_and_bad_schemas_over_openai(server):
    gpt = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    r = gpt.chat.completions.create(model="tiny", messages=ASK, max_tokens=48, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "messages": ASK, "response_format": bad})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    with pytest.raises(openai.BadRequestError):
        gpt.chat.completions.create(model="tiny", messages=ASK, tool_choice="required")
