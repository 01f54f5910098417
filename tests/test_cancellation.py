"""Requests end when their client leaves, and the server stops promptly whatever is in flight.

A non-streamed request is silent while the model reads its prompt (minutes for a long one on a
big model): the client's departure must still cancel it at once, not at its first token."""

import json
import socket
import time

import httpx
import pytest

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


def pages_and_running(serving) -> tuple[int, int]:
    """KV pages held by requests, and requests running, as the engine has them."""
    engine = serving.thread.engine
    return engine.pages.num_used, len(engine.scheduler.running)


def leave_mid_request(serving, url: str, path: str, body: dict, headers: dict) -> float:
    """Send a non-streamed request over a raw connection, close it once the engine runs it (the
    prompt still being read), and return the seconds until its pages and running slot are freed."""
    host, port = url.removeprefix("http://").split(":")
    baseline = pages_and_running(serving)
    data = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in {**headers, "Content-Type": "application/json",
                                                  "Content-Length": len(data)}.items())
    conn = socket.create_connection((host, int(port)))
    conn.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode() + data)
    deadline = time.monotonic() + 30
    while pages_and_running(serving)[1] == baseline[1]:
        assert time.monotonic() < deadline, "the request never ran"
        time.sleep(0.005)
    conn.close()
    left = time.monotonic()
    while pages_and_running(serving) != baseline:
        assert time.monotonic() < left + 30, "the request was never cancelled"
        time.sleep(0.005)
    return time.monotonic() - left


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
    assert serving.metrics.value("requests_total", finish_reason="abort") >= 1


def test_sigterm_ends_a_long_generation_within_seconds(tiny_dir, tmp_path):
    """`hybrid serve` told to stop with a stream open, while it reads the long prompt (stopped
    after the first token instead, a random model may already have ended its reply): the stream
    ends with an error event, the process is gone within 5 s."""
    served = Served(tiny_dir, tmp_path / "serve.log", key=KEY)
    body, headers = BODIES["/v1/messages"]
    events = []
    with httpx.stream("POST", served.url + "/v1/messages", json={**body, "stream": True}, headers=headers,
                      timeout=60) as response:
        lines = response.iter_lines()
        took = served.stop()
        for line in lines:
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert took < 5, f"the server took {took:.1f} s to stop:\n{served.text()[-2000:]}"
    assert served.process.returncode is not None
    assert events and events[-1]["type"] == "error", events[-3:]
    assert "shutting down" in events[-1]["error"]["message"]
