"""The server under load, and at rest: bench.endurance's round (1,000 streamed requests, 64 at a
time, a quarter of the clients leaving early) with its figures checked, and `hybrid serve` as a user
starts it: what it prints, when, and the CPU it uses while idle."""

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench import endurance
from served import free_port

IDLE_CPU = 0.02  # of one core: a server with nothing to do must not poll or spin


def test_a_thousand_streams_with_disconnects_leave_the_server_as_it_was(tiny_dir, tmp_path):
    fig = endurance.endurance(tiny_dir, requests=1000, concurrency=64, idle_s=5, log=tmp_path / "server.log",
                              say=lambda _: None)
    assert fig.errors == [], fig.errors[:5]
    assert fig.mismatched == [] and fig.incomplete == [], (fig.mismatched[:3], fig.incomplete[:3])
    assert fig.completed + fig.left_mid + fig.left_early == 1000
    assert 180 <= fig.left_mid + fig.left_early <= 320 and fig.left_early >= 20  # a quarter, some before a token
    before, after = fig.pages_before, fig.pages_after
    assert before["kv_pages_used"] == after["kv_pages_used"] == 0
    assert after["requests_running"] == after["requests_waiting"] == 0
    assert after["prefix_cache_pages"] == after["kv_pages_cached"] > 0  # every cached page free to evict
    assert fig.aborted > 0  # disconnects reached the engine
    assert fig.rss_after_mib - fig.rss_warm_mib < 16, (fig.rss_warm_mib, fig.rss_after_mib)
    assert fig.idle_cpu < IDLE_CPU


@pytest.fixture(scope="module")
def started(tiny_dir, tmp_path_factory):
    """`hybrid serve` started as a user does; (process, url, stderr lines up to `serving`, whether a
    connection was accepted the moment that line was printed)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([str(Path(sys.executable).with_name("hybrid")), "serve", "--model", str(tiny_dir),
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines, accepted = [], None
    try:
        for line in process.stderr:
            lines.append(line.rstrip("\n"))
            if line.startswith("serving"):
                accepted = httpx.get(url + "/health", timeout=5).status_code == 200
                break
        yield process, url, lines, accepted
    finally:
        process.terminate()
        process.wait(30)


def test_serve_says_what_it_serves_once_it_accepts_connections(started):
    process, url, lines, accepted = started
    assert accepted, "\n".join(lines)
    text = "\n".join(lines)
    for said in ("model: tiny", "placement:", "CPU experts: ", "threads", "CPU dense projections: ", "context: ",
                 "KV cache ", "thinking: ",
                 f"serving tiny at {url}"):
        assert said in text, text
    assert lines[-1].startswith("serving") and f"{url}/anthropic" in lines[-1]


def test_an_idle_server_uses_no_cpu(started):
    process, url, _, _ = started
    httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]}).raise_for_status()
    time.sleep(1)  # kernels' threads may spin briefly after work, then sleep
    assert endurance.idle_cpu(process.pid, 5) < IDLE_CPU
