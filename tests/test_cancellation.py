"""Requests end when their client leaves, and the server stops promptly whatever is in flight.

A non-streamed request is silent while the model reads its prompt (minutes for a long one on a
big model): the client's departure must still cancel it at once, not at its first token."""

import json

import httpx
import pytest

from conftest import leave_mid_request
from hybrid.engine import EngineConfig
from hybrid.server.app import create_app
from hybrid.server.http_server import ServerThread
from hybrid.server.serving import Serving
from served import Served

KEY = "cancel-key"
LONG = "Tell me everything about the weather in Paris. " * 400  # ~6,400 tokens: seconds to read
BODIES = {
    "/v1/chat/completions": ({"model": "tiny", "max_tokens": 4000, "messages": [{"role": "user", "content": LONG}]},
                             {"Authorization": f"Bearer {KEY}"}),
    "/v1/completions": ({"model": "tiny", "max_tokens": 4000, "prompt": LONG}, {"Authorization": f"Bearer {KEY}"}),
    "/v1/messages": ({"model": "claude-sonnet-4-5", "max_tokens": 4000, "messages": [{"role": "user", "content": LONG}]},
                     {"x-api-key": KEY}),
}


@pytest.fixture(scope="module")
def serving(tiny_dir):
    return Serving.load(tiny_dir, config=EngineConfig(kv_cache_tokens=16384))


@pytest.fixture(scope="module")
def server(serving):
    with ServerThread(create_app(serving, api_key=KEY)) as s:
        yield s


@pytest.mark.parametrize("path", list(BODIES))
def test_a_client_that_leaves_a_plain_request_cancels_it_at_once(server, serving, path):
    body, headers = BODIES[path]
    assert leave_mid_request(serving, server.url, path, body, headers) < 1.0
    assert serving.metrics.requests["abort"] >= 1


def test_sigterm_ends_a_long_generation_within_seconds(tiny_dir, tmp_path):
    """`hybrid serve` told to stop mid-stream: the stream ends with an error event, the process
    is gone within 5 s."""
    served = Served(tiny_dir, tmp_path / "serve.log", key=KEY)
    body, headers = BODIES["/v1/messages"]
    events = []
    with httpx.stream("POST", served.url + "/v1/messages", json={**body, "stream": True}, headers=headers,
                      timeout=60) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("event: content_block_delta"):
                break
        took = served.stop()
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert took < 5, f"the server took {took:.1f} s to stop:\n{served.text()[-2000:]}"
    assert served.process.returncode is not None
    assert events and events[-1]["type"] == "error", events[-3:]
    assert "shutting down" in events[-1]["error"]["message"]
