"""Constrained decoding: what a grammar costs per generated token, against the decode step it rides on.

Decodes the same prompt twice on the engine (batch of one, greedy): free, and as a forced tool call
whose arguments must satisfy a Claude-Code-sized JSON schema (llguidance, with the closing-cost
walk that guarantees the call finishes within max_tokens). Reports ms/token of both decode loops
and the grammar processor's own time per token, there (max_tokens near the shortest valid call,
so every step checks its candidates) and far from max_tokens (random logits, no model). Target:
the processor's time at most 10% of the free decode step. With --engines, also the mask time per
token of llguidance and xgrammar (if installed) on this vocabulary, for the same grammar, over
random walks through it.

    python -m bench.constrained [--preset mini] [--model DIR] [--tokens 96] [--engines]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench.common import save
from hybrid.api import load_model
from hybrid.default_model import preset_model
from hybrid.engine import Engine, SamplingParams
from hybrid.engine.constrained import JSON_STYLE, tool_call_grammar
from hybrid.engine.grammar import GrammarProcessor, grammar_vocab
from hybrid.tokenizer import Tokenizer
from hybrid.tokenizer.specials import TOOL_CALL_ARGS, TOOL_CALL_END

TARGET = 0.10
SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["file_path", "edits"],
    "properties": {
        "file_path": {"type": "string", "description": "The absolute path to the file to modify"},
        "edits": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["old_string", "new_string"],
            "properties": {"old_string": {"type": "string"}, "new_string": {"type": "string"},
                           "replace_all": {"type": "boolean"}}}},
        "mode": {"enum": ["strict", "fuzzy", "regex"]},
        "context_lines": {"type": "integer", "minimum": 0, "maximum": 20},
    },
}
TOOL = {"type": "function", "function": {"name": "MultiEdit", "description": "Edit a file", "parameters": SCHEMA}}


class Timed:
    """A logits processor that keeps the time spent in the one it wraps."""

    def __init__(self, processor):
        self.processor, self.seconds, self.calls = processor, 0.0, 0

    def __call__(self, output_ids, logits):
        start = time.perf_counter()
        out = self.processor(output_ids, logits)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def decode(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[int], float]:
    """(generated ids, seconds per decode step), the prefill step left out."""
    engine.add_request(prompt, params)
    ids, times, last = [], [], None
    while engine:
        for out in engine.step():
            ids += out.token_ids
        now = time.perf_counter()
        if last is not None:
            times.append(now - last)
        last = now
    return ids, float(np.mean(times)) if times else float("nan")


def processor_far_from_the_end(tokenizer: Tokenizer, grammar: str, steps: int) -> float:
    """ms per token of the processor alone, with random logits and a budget it never nears."""
    timed = Timed(GrammarProcessor(tokenizer, grammar, 1 << 30))
    gen = torch.Generator().manual_seed(0)
    out: list[int] = []
    while len(out) < steps and (not out or out[-1] not in tokenizer.eos_ids):
        out.append(int(timed(out, torch.randn(tokenizer.vocab_size, generator=gen)).argmax()))
    return 1e3 * timed.seconds / timed.calls


def engine_masks(tokenizer: Tokenizer, grammar: str, schema: dict, walks: int = 5, steps: int = 200) -> dict:
    """Mean ms per token to compute the next-token mask and consume a token, per grammar engine."""
    import llguidance
    rng = random.Random(0)
    n = tokenizer.vocab_size

    def walk(start, fill, consume, done):
        total, count = 0.0, 0
        for _ in range(walks):
            state = start()
            for _ in range(steps):
                if done(state):
                    break
                t = time.perf_counter()
                allowed = fill(state)
                total += time.perf_counter() - t
                token = int(rng.choice(allowed) if rng.random() < 0.5 else allowed[0])
                t = time.perf_counter()
                consume(state, token)
                total += time.perf_counter() - t
                count += 1
        return 1e3 * total / count

    vocab = grammar_vocab(tokenizer)
    compiled = llguidance.LLMatcher.grammar_from_lark(grammar)
    start = time.perf_counter()
    llguidance.LLMatcher(vocab.ll, compiled)
    results = {"llguidance": {"compile_ms": 1e3 * (time.perf_counter() - start), "ms_per_token": walk(
        lambda: llguidance.LLMatcher(vocab.ll, compiled),
        lambda m: np.flatnonzero(np.unpackbits(np.frombuffer(m.compute_bitmask(), np.uint8), count=n,
                                               bitorder="little")),
        lambda m, t: m.consume_token(t), lambda m: m.is_stopped())}}
    try:
        import xgrammar as xgr
    except ImportError:
        return results
    info = xgr.TokenizerInfo([tokenizer.token_bytes(i) for i in range(n)], xgr.VocabType.RAW, vocab_size=n,
                             stop_token_ids=sorted(tokenizer.eos_ids))
    compiler = xgr.GrammarCompiler(info)
    json_rule = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False,
                                             separators=(JSON_STYLE["item_separator"], JSON_STYLE["key_separator"]))
    special = tokenizer.special
    name = grammar.split('"', 2)[1]  # the call's id, as the llguidance grammar spells it
    tag = {"type": "structural_tag", "format": {"type": "sequence", "elements": [
        {"type": "token", "token": special["<|tool_calls_section_begin|>"]},
        {"type": "token", "token": special["<|tool_call_begin|>"]}, {"type": "const_string", "value": name},
        {"type": "token", "token": special["<|tool_call_argument_begin|>"]},
        {"type": "grammar", "grammar": str(json_rule)},
        {"type": "token", "token": special["<|tool_call_end|>"]},
        {"type": "token", "token": special["<|tool_calls_section_end|>"]}]}}
    start = time.perf_counter()
    compiled_x = compiler.compile_structural_tag(json.dumps(tag))
    compile_ms = 1e3 * (time.perf_counter() - start)
    bitmask = xgr.allocate_token_bitmask(1, n)

    def fill(m):
        m.fill_next_token_bitmask(bitmask)
        return np.flatnonzero(np.unpackbits(bitmask.numpy().view(np.uint8), count=n, bitorder="little"))

    results["xgrammar"] = {"compile_ms": compile_ms, "ms_per_token": walk(
        lambda: xgr.GrammarMatcher(compiled_x), fill, lambda m, t: m.accept_token(t),
        lambda m: m.is_terminated())}
    return results


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--tokens", type=int, default=96,
                    help="max_tokens of each decode (the shortest valid call takes 69 on mini)")
    ap.add_argument("--engines", action="store_true", help="also compare grammar engines' mask time")
    args = ap.parse_args()
    console = Console()
    folder = args.model or preset_model(args.preset, console.print)
    tokenizer = Tokenizer.from_pretrained(folder)
    engine = Engine(load_model(folder), tokenizer)
    messages = [{"role": "user", "content": "Rename the function parse_date to parse_day in utils.py."}]
    prompt = tokenizer.apply_chat_template(messages, [TOOL], thinking=False)
    grammar = tool_call_grammar({"MultiEdit": SCHEMA}, 0)

    decode(engine, prompt, SamplingParams(temperature=0, max_tokens=2))  # warm up; the prompt is cached after
    free_ids, free_s = decode(engine, prompt, SamplingParams(temperature=0, max_tokens=args.tokens))
    timed = Timed(GrammarProcessor(tokenizer, grammar, args.tokens))
    constrained_ids, constrained_s = decode(
        engine, prompt, SamplingParams(temperature=0, max_tokens=args.tokens, logits_processors=[timed]))
    processor_ms = 1e3 * timed.seconds / timed.calls
    call = tokenizer.decode(constrained_ids)
    arguments = call.split(TOOL_CALL_ARGS)[1].split(TOOL_CALL_END)[0]
    complete = constrained_ids[-1] in tokenizer.eos_ids and _is_json(arguments)
    figures = {"tokens_free": len(free_ids), "tokens_constrained": len(constrained_ids),
               "free_ms_per_token": 1e3 * free_s, "constrained_ms_per_token": 1e3 * constrained_s,
               "processor_ms_per_token": processor_ms, "processor_share": processor_ms / (1e3 * free_s),
               "constrained_output": call, "complete_call": complete, "vocab": tokenizer.vocab_size,
               "processor_far_ms_per_token": processor_far_from_the_end(tokenizer, grammar, args.tokens)}

    table = Table(title=f"Constrained decoding, {args.preset} preset (vocabulary {tokenizer.vocab_size:,})")
    for col in ("measure", "value", "note"):
        table.add_column(col)
    rows = [("free decode step", f"{1e3 * free_s:.1f} ms/token", f"{len(free_ids)} tokens"),
            ("constrained decode step", f"{1e3 * constrained_s:.1f} ms/token",
             f"{len(constrained_ids)} tokens, a forced MultiEdit call, {'complete' if complete else 'CUT SHORT'}"),
            ("grammar processor", f"{processor_ms:.2f} ms/token",
             f"{100 * figures['processor_share']:.1f}% of the free step (target <= {100 * TARGET:.0f}%), "
             "all of it within reach of max_tokens"),
            ("grammar processor, far from max_tokens", f"{figures['processor_far_ms_per_token']:.2f} ms/token",
             "random logits, no model")]
    if args.engines:
        figures["engines"] = engine_masks(tokenizer, grammar, SCHEMA)
        for name, r in figures["engines"].items():
            rows.append((f"{name} mask + consume", f"{r['ms_per_token']:.3f} ms/token",
                         f"grammar compiled in {r['compile_ms']:.1f} ms"))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"constrained output: {call!r}")
    md = "| measure | value | note |\n|---|---|---|\n" + "".join(f"| {' | '.join(r)} |\n" for r in rows)
    save(f"constrained_{args.preset}", figures, md)


if __name__ == "__main__":
    main()
