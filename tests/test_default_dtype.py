"""The engine and the server in the dtype users get (bf16, with the CPU kernels it brings: kt-kernel
experts, oneDNN projections where the CPU has bf16), not the float32 the exact tests use: greedy
replies are those of the model decoding each prompt by itself, prompts past 256 positions included
(where bf16 can no longer hold a position exactly)."""

import openai
import pytest
import torch

from hybrid.api import load_model
from hybrid.engine import Engine, SamplingParams
from hybrid.server.app import create_app
from hybrid.server.http_server import ServerThread
from hybrid.server.serving import Serving

KEY = "default-dtype"
NEW = 8


def same_greedy(got: list[int], want: list[int], logits: torch.Tensor) -> None:
    """`got` is the reference's greedy reply `want`, except that from a step where the reference's
    two candidates are within bf16 rounding of each other (1% of the row's largest logit) the two
    may go their own ways."""
    for step, (a, b) in enumerate(zip(got, want)):
        if a != b:
            row = logits[step]
            assert row[b] - row[a] <= 0.01 * row.abs().max(), (step, got, want)
            return
    assert len(got) == len(want), (got, want)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(11)
    return [torch.randint(0, 1000, (n,), generator=g).tolist() for n in (5, 40, 300)]


def test_the_engine_in_the_default_dtype_decodes_as_the_model_alone(tiny_dir, prompts):
    model = load_model(tiny_dir)
    assert model.decoder.lm_head.weight.dtype == torch.bfloat16
    engine = Engine(model)
    for p in prompts:
        got = engine.generate([p], SamplingParams(temperature=0, max_tokens=NEW))[0]
        want, logits = model.generate(p, NEW, stop_ids=engine.stop_ids, return_logits=True)
        same_greedy(got, want, logits)
    assert engine.pages.num_used == 0


@pytest.fixture(scope="module")
def serving(tiny_dir):
    return Serving.load(tiny_dir)


def test_the_server_in_the_default_dtype_replies_as_the_model_alone(serving, monkeypatch):
    replies: list[list[int]] = []
    generate = serving.generate

    async def recording(prompt_ids, params, arrival=None):
        replies.append([])
        async for out in generate(prompt_ids, params, arrival):
            replies[-1].extend(out.token_ids)
            yield out

    monkeypatch.setattr(serving, "generate", recording)
    model = serving.thread.engine.runner.model
    assert model.decoder.lm_head.weight.dtype == torch.bfloat16
    messages = [{"role": "user", "content": "Tell me about the weather in Paris. " * 30}]
    prompt = serving.chat_prompt(messages, None, thinking=False)
    assert len(prompt) > 256
    with ServerThread(create_app(serving, api_key=KEY)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        r = client.chat.completions.create(model=serving.model_name, messages=messages, max_tokens=NEW,
                                           temperature=0, extra_body={"thinking": {"type": "disabled"}})
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(replies[0])
    want, logits = model.generate(prompt, NEW, stop_ids=serving.thread.engine.stop_ids, return_logits=True)
    same_greedy(replies[0], want, logits)
