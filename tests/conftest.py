import json
import os

import openai
import hybrid  # noqa: F401  (first: it sets OpenMP's spin before torch loads, as the `hybrid` command does)
import pytest
import torch

from hybrid.engine import EngineConfig
from hybrid.model.synthetic import write_checkpoint
from hybrid.server.app import create_app
from hybrid.server.http_server import ServerThread
from hybrid.server.serving import Serving
from hybrid.tokenizer import Tokenizer, write_tokenizer
from scripted import ANSWER, REASONING, write_scripted
from served import Served

KEY = "test-key"  # the API key of the servers the tests start
SCRIPTED = "kimi-scripted"  # the name `served` serves its model under
HI = [{"role": "user", "content": "Hello! What is the weather in Paris?"}]  # a first turn, in either API's form

torch.set_num_threads(2)

# Where the dense modules of the offload and KV-tier tests run: the CPU plays the GPU's role unless
# a machine with one sets HYBRID_TEST_DEVICE=cuda:0, and then the same tests check the GPU paths.
DEVICE = os.environ.get("HYBRID_TEST_DEVICE", "cpu")

# Architecture variants the parity tests cover: name -> write_checkpoint overrides.
VARIANTS = {
    "kimi": {},
    "grouped": {"n_group": 4, "topk_group": 2},
    "no_q_lora": {"q_lora_rank": None},
    "no_dense_yarn": {"first_k_dense_replace": 0,
                      "rope_scaling": {"factor": 8.0, "beta_fast": 32.0, "mscale": 0.707}},
    "nested": {"nested": True},
    "fp8": {"quant": "fp8"},
}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_dir(models_dir):
    """The default tiny preset (Kimi layout, INT4 routed experts)."""
    return write_checkpoint(models_dir / "tiny")


@pytest.fixture(scope="session")
def variant_dir(models_dir):
    def make(name: str):
        return write_checkpoint(models_dir / name, seed=1, **VARIANTS[name])
    return make


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """A Kimi-format tokenizer with 2,048 base tokens."""
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, 2048)
    return Tokenizer.from_pretrained(path)


def token_ids(tok, *pieces):
    """Ids written out by hand: special tokens by name, everything else plain text."""
    return [i for p in pieces for i in ([tok.special[p]] if p in tok.special else tok.encode(p))]



@pytest.fixture(scope="module")
def serving(tiny_dir):
    """The tiny model in float32 behind an engine thread, one per test module (a module may
    define its own)."""
    return Serving.load(tiny_dir, dtype=torch.float32, config=EngineConfig(kv_cache_tokens=16384))


@pytest.fixture(scope="module")
def server(serving):
    """The app on a loopback port (uvicorn in a thread), behind KEY."""
    with ServerThread(create_app(serving, api_key=KEY, max_body_bytes=1 << 20)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def scripted(tiny_dir, tmp_path_factory):
    """The tiny preset rewired to reason REASONING and answer ANSWER (tests/scripted.py)."""
    return write_scripted(tiny_dir, tmp_path_factory.mktemp("scripted") / "model", REASONING, ANSWER)


@pytest.fixture(scope="module")
def served(scripted, tmp_path_factory):
    """`hybrid serve` of the scripted model in a process of its own, as a user starts it, behind KEY."""
    server = Served(scripted, tmp_path_factory.mktemp("serve") / "serve.log", KEY, "--served-model-name", SCRIPTED)
    yield server
    server.stop()


@pytest.fixture
def engine(monkeypatch, serving):
    """What reaches the engine of the module's `serving`: `engine.prompts` and `engine.params` record
    each request; `engine.script(ids)` makes the model write the given reply (a processor forces
    each token, in place of any other)."""
    class Calls:
        def __init__(self):
            self.prompts: list[list[int]] = []
            self.params: list = []
            self.reply: list[int] | None = None

        def script(self, ids: list[int]) -> None:
            self.reply = ids

    calls = Calls()
    generate = serving.generate

    def record(prompt_ids, params, arrival=None):
        calls.prompts.append(list(prompt_ids))
        calls.params.append(params)
        if calls.reply is not None:
            reply = calls.reply
            params.logits_processors = [lambda out, row: torch.full_like(row, float("-inf")).index_fill_(
                0, torch.tensor([reply[len(out)]]), 0.0)]
        return generate(prompt_ids, params, arrival)

    monkeypatch.setattr(serving, "generate", record)
    return calls


@pytest.fixture
def sampled(monkeypatch):
    """(logits row, sampled token) of every token the engine samples for a request that asks for
    log-probabilities while the test runs, the logits as the sampler received them."""
    from hybrid.engine import engine

    seen: list[tuple[torch.Tensor, int]] = []
    sample = engine.sample

    def recording(logits, params, outputs, generators):
        rows = logits.clone()
        tokens = sample(logits, params, outputs, generators)
        seen.extend((row, token) for row, token, p in zip(rows, tokens, params) if p.logprobs is not None)
        return tokens

    monkeypatch.setattr(engine, "sample", recording)
    return seen


def sse_events(text: str) -> list[dict]:
    """The events of a server-sent event stream, each named (`event:`) by its type."""
    out = []
    for chunk in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]
        out.append(data)
    return out
