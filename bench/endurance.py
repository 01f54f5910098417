"""Endurance over HTTP on loopback: many concurrent streamed clients against one server, some of them
leaving mid-stream or before their first token, then the same server idle.

The server (a child process: the tiny preset in float32, so routed experts run on the torch backend
and greedy replies do not depend on how requests are batched) first answers each distinct request
alone; then `--requests` requests drawn from them, of mixed prompt and reply sizes, over both APIs
(OpenAI chat completions and Anthropic messages, all streamed), run with `--concurrency` clients at
once. A random quarter of the clients disconnect mid-stream, a few before their first token.
Checked: no 5xx and no error event; every stream that was not cut short is complete and equal to
its solo reply; afterwards no KV page is held, every prefix-cache page is free to evict, and nothing
waits or runs; the process's RSS after the run against after warm-up. Then the CPU the idle server
uses over `--idle-s` seconds, for this server and for `hybrid serve` with its defaults (where
kt-kernel runs, its pool).

    python -m bench.endurance [--requests 1000] [--concurrency 64] [--idle-s 30]

tests/test_endurance.py runs a smaller round of the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.common import ROOT, report as report_rows

DISCONNECT_SHARE = 0.25  # clients that leave mid-stream ...
EARLY_SHARE = 0.2  # ... of which this share leave before their first token
REPLY_TOKENS = (1, 2, 4, 8, 16, 24)
WORDS = ("the model reads a prompt and writes a reply one token at a time while the cache keeps what it "
         "has read so that the next turn starts where this one ended").split()


@dataclass(frozen=True)
class Spec:
    """One distinct request: the API, its prompt and its reply length."""

    api: str  # "openai" or "anthropic"
    system: str
    user: str
    max_tokens: int

    def body(self) -> tuple[str, dict]:
        messages = [{"role": "user", "content": self.user}]
        if self.api == "openai":
            return "/v1/chat/completions", {
                "model": "tiny", "stream": True, "temperature": 0, "max_tokens": self.max_tokens,
                "thinking": {"type": "disabled"}, "messages": [{"role": "system", "content": self.system}] + messages}
        return "/v1/messages", {"model": "any", "stream": True, "temperature": 0, "max_tokens": self.max_tokens,
                                "system": self.system, "messages": messages}


def specs(n: int, seed: int = 0) -> list[Spec]:
    """`n` distinct requests of mixed sizes: prompts of a few to ~1,500 tokens (some sharing a long
    system prompt, as agents' turns do), replies of 1 to 24 tokens, a quarter over the Anthropic API."""
    rng = random.Random(seed)
    shared = " ".join(rng.choice(WORDS) for _ in range(300))

    def text(words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words))

    out = []
    for i in range(n):
        size = rng.choice((2, 10, 40, 120, 400))
        system = shared if i % 3 == 0 else f"Assistant {i}. " + text(rng.choice((1, 5, 20)))
        out.append(Spec("anthropic" if i % 4 == 3 else "openai", system, f"Question {i}: " + text(size),
                        rng.choice(REPLY_TOKENS)))
    return out


@dataclass
class Result:
    status: int | None = None
    text: str = ""
    complete: bool = False
    error: str | None = None
    left: str | None = None  # "early" or "mid" when the client left on purpose
    events: int = 0


async def run_one(http: httpx.AsyncClient, spec: Spec, leave_after: int | None) -> Result:
    """Stream one request; with `leave_after` pieces of text read, close the connection there (0: as
    soon as the response starts, before any token)."""
    path, body = spec.body()
    result = Result()
    async with http.stream("POST", path, json=body) as r:
        result.status = r.status_code
        if r.status_code != 200:
            result.error = (await r.aread()).decode(errors="replace")[:300]
            return result
        if leave_after == 0:
            result.left = "early"
            return result
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                result.error = json.dumps(data)[:300]
                return result
            piece, done = _piece(spec.api, data)
            if piece:
                result.text += piece
                result.events += 1
            result.complete |= done
            if leave_after is not None and result.events >= leave_after:
                result.left = "mid"
                return result  # leaving the block closes the connection mid-stream
    return result


def _piece(api: str, data: dict) -> tuple[str, bool]:
    """(text this event adds, whether it ends the reply)."""
    if api == "openai":
        choice = data["choices"][0] if data.get("choices") else {}
        delta = choice.get("delta", {})
        return (delta.get("content") or "") + (delta.get("reasoning_content") or ""), bool(choice.get("finish_reason"))
    if data["type"] == "content_block_delta":
        return data["delta"].get("text") or data["delta"].get("thinking") or "", False
    return "", data["type"] == "message_stop"


def metrics(url: str) -> dict[str, float]:
    """The server's metrics by name (labelled ones with their labels, `requests_total{...}`)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^hybrid_(\S+) (\S+)$", text, re.M)}


def settle(url: str, timeout: float = 30) -> dict[str, float]:
    """The server's gauges once nothing runs or waits (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        if (m["requests_running"] == 0 and m["requests_waiting"] == 0 and m["kv_pages_used"] == 0) \
                or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_cpu(pid: int, seconds: float) -> float:
    """The share of one core the process uses over `seconds` while nobody talks to it."""
    start, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - start) / (time.monotonic() - t0)


class Child:
    """A server in a child process; its URL once it accepts connections."""

    def __init__(self, command: list[str], log: Path, timeout: float = 180):
        self.log = log
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, cwd=ROOT)
        deadline = time.monotonic() + timeout
        self.url = ""
        while not self.url:
            line = self.process.stdout.readline()
            if not line and self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start:\n{log.read_text()[-3000:]}")
            self.url = line.strip() if line.startswith("http") else ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve_child(model: str, kv_tokens: int) -> None:
    """The child: serve `model` in float32 on a free loopback port; print the URL once it is up."""
    import torch

    from hybrid.engine import EngineConfig
    from hybrid.server.app import create_app
    from hybrid.server.http_server import Server, bind, url_of
    from hybrid.server.serving import Serving

    torch.set_num_threads(1)  # the clients need the other core of a 2-core machine
    serving = Serving.load(model, dtype=torch.float32, config=EngineConfig(kv_cache_tokens=kv_tokens))
    sock = bind("127.0.0.1", 0)
    Server(create_app(serving), on_started=lambda: print(url_of(sock), flush=True)).run(sockets=[sock])


@dataclass
class Figures:
    requests: int
    concurrency: int
    distinct: int
    left_mid: int = 0
    left_early: int = 0
    completed: int = 0
    mismatched: list = field(default_factory=list)
    incomplete: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # 5xx, error events, unexpected statuses
    warm_s: float = 0.0
    wall_s: float = 0.0
    aborted: int = 0  # requests the server ended because their client left
    pages_before: dict = field(default_factory=dict)
    pages_after: dict = field(default_factory=dict)
    rss_warm_mib: float = 0.0
    rss_after_mib: float = 0.0
    idle_cpu: float = 0.0
    idle_s: float = 0.0


async def load(url: str, plan: list[tuple[Spec, int | None]], concurrency: int) -> list[Result]:
    """Run the plan's requests, `concurrency` at a time; their results in plan order."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        async def client(spec: Spec, leave_after: int | None) -> Result:
            async with gate:
                return await run_one(http, spec, leave_after)

        return await asyncio.gather(*(client(spec, leave) for spec, leave in plan))


def endurance(model: Path, requests: int = 1000, concurrency: int = 64, distinct: int = 48, seed: int = 0,
              kv_tokens: int = 32768, idle_s: float = 30.0, log: Path = Path("/tmp/hybrid-endurance.log"),
              say=print) -> Figures:
    """Run the whole endurance round against a fresh child server; the figures (nothing asserted)."""
    rng = random.Random(seed)
    pool = specs(distinct, seed)
    plan = []
    for _ in range(requests):
        spec = rng.choice(pool)
        leave = None
        if rng.random() < DISCONNECT_SHARE:
            leave = 0 if rng.random() < EARLY_SHARE else rng.randint(1, max(1, spec.max_tokens - 1))
        plan.append((spec, leave))
    fig = Figures(requests, concurrency, distinct)
    child = Child([sys.executable, "-m", __spec__.name, "--child", str(model), "--kv-tokens", str(kv_tokens)], log)
    try:
        say(f"server up at {child.url}; solo replies of {distinct} distinct requests")
        solo = {spec: r for spec, r in zip(pool, asyncio.run(load(child.url, [(s, None) for s in pool], 1)))}
        bad = [s for s, r in solo.items() if not r.complete or r.error]
        if bad:
            raise RuntimeError(f"solo requests failed: {[solo[s] for s in bad][:3]}")
        warm = requests // 5  # warm-up: the first fifth, after which memory must stay flat
        say(f"warm-up: {warm} requests")
        start = time.monotonic()
        results = asyncio.run(load(child.url, plan[:warm], concurrency))
        fig.warm_s = time.monotonic() - start
        fig.pages_before = settle(child.url)
        fig.rss_warm_mib = rss_mib(child.pid)
        say(f"load: {requests - warm} more requests, {concurrency} at a time")
        start = time.monotonic()
        results += asyncio.run(load(child.url, plan[warm:], concurrency))
        fig.wall_s = time.monotonic() - start
        fig.pages_after = settle(child.url)
        fig.rss_after_mib = rss_mib(child.pid)
        fig.aborted = int(fig.pages_after.get('requests_total{finish_reason="abort"}', 0))
        for (spec, leave), r in zip(plan, results):
            if r.status is not None and r.status != 200 or r.error:
                fig.errors.append((spec.api, r.status, r.error))
            elif r.left == "mid":
                fig.left_mid += 1
            elif r.left == "early":
                fig.left_early += 1
            elif not r.complete:
                fig.incomplete.append((spec.api, r.text[:80]))
            elif r.text != solo[spec].text:
                fig.mismatched.append((spec.api, r.text[:80], solo[spec].text[:80]))
            else:
                fig.completed += 1
        if idle_s:
            say(f"idle for {idle_s:.0f} s")
            fig.idle_s, fig.idle_cpu = idle_s, idle_cpu(child.pid, idle_s)
    finally:
        child.stop()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--distinct", type=int, default=48)
    ap.add_argument("--idle-s", type=float, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-tokens", type=int, default=32768)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return serve_child(args.child, args.kv_tokens)

    from rich.console import Console

    from hybrid.default_model import preset_model

    console = Console()
    model = preset_model("tiny", console.print)
    fig = endurance(model, args.requests, args.concurrency, args.distinct, args.seed, args.kv_tokens, args.idle_s,
                    say=console.print)
    console.print(f"`hybrid serve` with its defaults, idle for {args.idle_s:.0f} s after one request")
    serve_idle = idle_hybrid_serve(model, args.idle_s)
    report(fig, serve_idle, console)


def idle_hybrid_serve(model: Path, seconds: float) -> dict:
    """`hybrid serve` as a user starts it (bf16; kt-kernel where it runs): the CPU it uses idle."""
    from hybrid.server.http_server import bind, url_of

    sock = bind("127.0.0.1", 0)
    url = url_of(sock)
    sock.close()
    port = url.rsplit(":", 1)[1]
    server = subprocess.Popen([str(Path(sys.executable).with_name("hybrid")), "serve", "--model", str(model),
                               "--port", port], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kernel = "?"
    try:
        for line in server.stderr:
            if line.startswith("CPU experts:"):
                kernel = line.split(":", 1)[1].strip()
            if line.startswith("serving"):
                break
        httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello"}]}).raise_for_status()
        time.sleep(1)
        return {"kernel": kernel, "idle_cpu": idle_cpu(server.pid, seconds), "idle_s": seconds}
    finally:
        server.terminate()
        server.wait(30)


def report(fig: Figures, serve_idle: dict, console) -> None:
    b, a = fig.pages_before, fig.pages_after
    rows = [
        ("requests (after the solo round)", f"{fig.requests:,}", f"{fig.concurrency} concurrent streamed clients, "
                                                                  f"{fig.distinct} distinct requests, both APIs"),
        ("disconnected mid-stream", f"{fig.left_mid}", ""),
        ("cancelled before the first token", f"{fig.left_early}", ""),
        ("requests the server aborted (client gone)", f"{fig.aborted}", "the rest had finished first"),
        ("completed, equal to the solo reply", f"{fig.completed}", ""),
        ("completed, different from the solo reply", f"{len(fig.mismatched)}", ""),
        ("cut short without leaving", f"{len(fig.incomplete)}", ""),
        ("errors (5xx, error events, other statuses)", f"{len(fig.errors)}", ""),
        ("KV pages held, after warm-up / after", f"{b['kv_pages_used']:.0f} / {a['kv_pages_used']:.0f}",
         f"of {a['kv_pages_total']:.0f}"),
        ("prefix-cache pages, all free to evict: before / after",
         f"{b['prefix_cache_pages']:.0f} ({b['kv_pages_cached']:.0f} free) / "
         f"{a['prefix_cache_pages']:.0f} ({a['kv_pages_cached']:.0f} free)", ""),
        ("requests running / waiting after", f"{a['requests_running']:.0f} / {a['requests_waiting']:.0f}", ""),
        ("server RSS after warm-up / after", f"{fig.rss_warm_mib:.0f} / {fig.rss_after_mib:.0f} MiB",
         f"{fig.rss_after_mib - fig.rss_warm_mib:+.1f} MiB"),
        ("wall time: warm-up / load", f"{fig.warm_s:.1f} / {fig.wall_s:.1f} s",
         f"{fig.requests // 5} / {fig.requests - fig.requests // 5} requests, "
         f"{(fig.requests - fig.requests // 5) / fig.wall_s:.1f} req/s in the load"),
        (f"idle CPU over {fig.idle_s:.0f} s, this server (torch backend)", f"{100 * fig.idle_cpu:.2f}% of a core", ""),
        (f"idle CPU over {serve_idle['idle_s']:.0f} s, `hybrid serve` defaults",
         f"{100 * serve_idle['idle_cpu']:.2f}% of a core", serve_idle["kernel"]),
    ]
    report_rows("endurance_tiny", "Endurance on loopback (tiny preset)", rows,
                vars(fig) | {"hybrid_serve_idle": serve_idle}, console)


if __name__ == "__main__":
    main()
