"""Serving over HTTP on loopback: a load generator against `hybrid serve`, which it starts itself.

Measures single-stream decode tokens/s (64-token replies) in turns with the model's own (the same
model loaded in a child process, no server: this machine's bandwidth moves by 1.5x from minute to
minute, so the two are compared round by round; target: the server within 10% of it), and time to
first token (TTFT); aggregate tokens/s with 1, 4 and 16 concurrent streams;
and the TTFT of a second turn that shares a 2,000-token prefix with the first against the first's
(cold) TTFT (target: at most 15% of it). Every phase is bounded in requests and tokens, and the
whole run in time.

    python -m bench.serve [--preset mini] [--model DIR] [--budget-s 540]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console

from bench.common import report as report_rows
from hybrid.default_model import preset_model
from hybrid.tokenizer import Tokenizer

CONCURRENCY = (1, 4, 16)
PREFIX_TOKENS = 2000
TARGET = 0.15
SERVER_LOSS = 0.10  # the most of the model's own decode rate the server may lose
ROUNDS = 5  # single-stream replies, each between two of the model's own
PROMPT_TOKENS = 48  # about the chat prompt of a single-stream request


@dataclass
class Run:
    """One streamed request as the client saw it."""

    ttft: float
    decode_s: float  # first token to last
    tokens: int
    cached: int
    prompt: int

    @property
    def decode_tok_s(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s > 0 else 0.0


async def stream(http: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int) -> Run:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "thinking": {"type": "disabled"}}
    start = time.perf_counter()
    first = last = None
    usage = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
            if any(delta.get(k) for k in ("content", "reasoning_content", "tool_calls")):
                last = time.perf_counter()
                first = first or last
    first = first or time.perf_counter()
    return Run(first - start, (last or first) - first, usage["completion_tokens"],
               usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"])


def words(tokenizer: Tokenizer, n_tokens: int, seed: int) -> str:
    """Random English-like text of about n_tokens tokens."""
    rng = random.Random(seed)
    vocab = ["the", "model", "cache", "expert", "token", "layer", "memory", "prompt", "stream", "kernel",
             "router", "latent", "page", "batch", "server", "request", "reply", "history", "prefix", "turn"]
    text = ""
    while len(tokenizer.encode(text)) < n_tokens:
        text += " ".join(rng.choice(vocab) for _ in range(50)) + ".\n"
    return text


async def measure(url: str, model: str, tokenizer: Tokenizer, own: OwnDecode, deadline: float,
                  console: Console) -> dict:
    out: dict = {}
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        ask = lambda i: [{"role": "user", "content": f"Question {i}: how does a mixture of experts route tokens?"}]
        await stream(http, model, ask(-1), 4)  # warm-up

        console.print("single stream, in turns with the model's own")
        mine, served = [own.tok_s()], []
        for i in range(ROUNDS):
            served.append(await stream(http, model, ask(i), OwnDecode.TOKENS))
            mine.append(own.tok_s())
        ratios = sorted(r.decode_tok_s / ((a + b) / 2) for r, a, b in zip(served, mine, mine[1:]))
        single = max(served, key=lambda r: r.decode_tok_s)
        out["single"] = {"decode_tok_s": single.decode_tok_s, "ttft_s": single.ttft, "tokens": single.tokens,
                         "rounds": [r.decode_tok_s for r in served]}
        out["model_decode_tok_s"], out["own_rounds"] = max(mine), mine
        out["ratio"] = ratios[len(ratios) // 2]  # the median round

        out["concurrent"] = {}
        for c in CONCURRENCY:
            if time.monotonic() > deadline:
                break
            console.print(f"{c} concurrent streams")
            start = time.perf_counter()
            runs = await asyncio.gather(*(stream(http, model, ask(100 * c + i), 16) for i in range(c)))
            wall = time.perf_counter() - start
            out["concurrent"][c] = {"aggregate_tok_s": sum(r.tokens for r in runs) / wall,
                                    "mean_ttft_s": sum(r.ttft for r in runs) / c, "wall_s": wall,
                                    "tokens": sum(r.tokens for r in runs)}

        if time.monotonic() < deadline:
            console.print(f"second turn after a {PREFIX_TOKENS}-token prefix")
            system = [{"role": "system", "content": words(tokenizer, PREFIX_TOKENS, seed=1)}]
            turn1 = system + [{"role": "user", "content": "Summarise the notes above."}]
            cold = await stream(http, model, turn1, 8)
            turn2 = turn1 + [{"role": "assistant", "content": "The notes describe a serving system."},
                             {"role": "user", "content": "What does the prefix cache do?"}]
            warm = await stream(http, model, turn2, 8)
            out["prefix"] = {"cold_ttft_s": cold.ttft, "cold_prompt_tokens": cold.prompt,
                             "warm_ttft_s": warm.ttft, "warm_prompt_tokens": warm.prompt,
                             "warm_cached_tokens": warm.cached, "ratio": warm.ttft / cold.ttft}
    return out


class OwnDecode:
    """The model's own single-stream greedy decode, in a child process that keeps it loaded: one
    reply of `TOKENS` tokens after a prompt of the length the server's has, prefill excluded
    (`hybrid.measure.measure`), each time `tok_s` is called."""

    TOKENS = 64

    def __init__(self, folder: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.serve", "--own", str(folder)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise SystemExit("the model's own decode could not start")

    def tok_s(self) -> float:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)

    @classmethod
    def child(cls, folder: Path) -> None:
        from hybrid.api import load_model
        from hybrid.measure import measure

        model = load_model(folder)
        model.warm_up()
        print("ready", flush=True)
        for _ in sys.stdin:
            print(measure(model, PROMPT_TOKENS, cls.TOKENS).decode_tok_s, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str, *names: str) -> list[float]:
    """Values of the server's own counters, from /metrics."""
    lines = dict(line.split(" ", 1) for line in httpx.get(url + "/metrics").text.splitlines() if line[0] != "#")
    return [float(lines[f"hybrid_{name}"]) for name in names]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the preset's)")
    ap.add_argument("--budget-s", type=float, default=540, help="stop starting new phases after this long")
    ap.add_argument("--own", type=Path, default=None, help=argparse.SUPPRESS)  # the child of OwnDecode
    args = ap.parse_args()
    if args.own:
        return OwnDecode.child(args.own)
    console = Console()
    start = time.monotonic()
    folder = args.model or preset_model(args.preset, console.print)
    with console.status("loading the model for its own decode (a child process)"):
        own = OwnDecode(folder)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix="hybrid-serve-", suffix=".log", delete=False)
    server = subprocess.Popen([str(Path(sys.executable).with_name("hybrid")), "serve", "--model", str(folder),
                               "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        with console.status(f"starting the server on {folder} (log: {log.name})"):
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited ({server.returncode}); see {log.name}")
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.5)
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        console.print(f"server up in {time.monotonic() - start:.0f} s")
        results = asyncio.run(measure(url, model, Tokenizer.from_pretrained(folder), own, start + args.budget_s,
                                      console))
        results["forward_s"], results["expert_s"] = scrape(url, "forward_seconds_total", "expert_wait_seconds_total")
    finally:
        own.close()
        server.terminate()
        server.wait(30)
    report(results, args.preset, console)


def report(r: dict, preset: str, console: Console) -> None:
    served, own = r["single"]["decode_tok_s"], r["model_decode_tok_s"]
    rows = [("single-stream decode", f"{served:.2f} tok/s",
             f"{r['ratio']:.2f} of the model's own, median of {ROUNDS} rounds in turns (target >= "
             f"{1 - SERVER_LOSS:.2f})"),
            ("the model's own single-stream decode, same run", f"{own:.2f} tok/s",
             "no server; best of its rounds"),
            ("single-stream TTFT (short prompt)", f"{r['single']['ttft_s']:.2f} s", "")]
    for c, v in r["concurrent"].items():
        rows.append((f"aggregate decode, {c} stream{'s' * (c > 1)}", f"{v['aggregate_tok_s']:.2f} tok/s",
                     f"mean TTFT {v['mean_ttft_s']:.2f} s"))
    if "prefix" in r:
        p = r["prefix"]
        rows += [(f"TTFT cold, {p['cold_prompt_tokens']}-token prompt", f"{p['cold_ttft_s']:.2f} s", ""),
                 (f"TTFT second turn, {p['warm_prompt_tokens']} tokens ({p['warm_cached_tokens']} cached)",
                  f"{p['warm_ttft_s']:.2f} s",
                  f"{100 * p['ratio']:.1f}% of cold (target <= {100 * TARGET:.0f}%)")]
    rows.append(("routed experts' share of forward time", f"{100 * r['expert_s'] / r['forward_s']:.0f}%",
                 f"{r['expert_s']:.0f} of {r['forward_s']:.0f} s, whole run"))
    report_rows(f"serve_{preset}", f"Serving the {preset} preset over HTTP (loopback)", rows, r, console)


if __name__ == "__main__":
    main()
