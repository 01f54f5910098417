"""A chat reply as it streams out of the engine, turned into typed events any API can render:
reasoning text, answer text, tool calls (start, argument fragments, end); with the counts usage needs."""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

from hybrid.engine import RequestOutput
from hybrid.tokenizer import (Event, ReasoningDelta, ReasoningParser, TextDelta, Tokenizer, ToolCallParser,
                              ToolCallStart)
from hybrid.tokenizer.specials import TOOL_CALLS_BEGIN

ReplyEvent = ReasoningDelta | Event


class ReplyParser:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], parse_tools: bool,
                 call_id: Callable[[int], str] | None = None):
        """parse_tools: read tool-call markup as calls (else it stays text). Reasoning is open from
        the start when the prompt ends with `<think>` (the template opens it when thinking is on).
        call_id: the client-style id of the reply's call number i (else the model's own id)."""
        self._call_id = call_id
        self._think = tokenizer.think_start_id
        self._think_end = tokenizer.think_end_id
        self._calls_begin = tokenizer.special.get(TOOL_CALLS_BEGIN)
        self._eos = tokenizer.eos_ids
        self._open = bool(prompt_ids) and prompt_ids[-1] == self._think
        self._started = False
        self._reasoning = ReasoningParser(in_reasoning=self._open)
        self._tools = ToolCallParser() if parse_tools else None
        self.reasoning_tokens = 0
        self.num_tool_calls = 0

    def feed(self, out: RequestOutput) -> list[ReplyEvent]:
        self._count(out.token_ids)
        parts = [self._reasoning.feed(out.text)]
        if out.finished:
            parts.append(self._reasoning.flush())
        events: list[ReplyEvent] = []
        for part in parts:
            if part.reasoning:
                events.append(ReasoningDelta(reasoning=part.reasoning))
            if part.content:
                events += self._tools.feed(part.content) if self._tools else [TextDelta(part.content)]
        if out.finished and self._tools:
            events += self._tools.flush()
        if self._call_id:
            events = [replace(e, id=self._call_id(e.index)) if isinstance(e, ToolCallStart) else e for e in events]
        self.num_tool_calls += sum(isinstance(e, ToolCallStart) for e in events)
        return events

    def finish_reason(self, out: RequestOutput) -> str:
        """The engine's reason, as OpenAI names it: a reply that called tools ends with "tool_calls"."""
        return "tool_calls" if out.finish_reason == "stop" and self.num_tool_calls else out.finish_reason

    def _count(self, token_ids: list[int]) -> None:
        """Reasoning tokens: those up to `</think>` (or before a tool-call section) once reasoning opened."""
        for t in token_ids:
            if not self._started:
                self._started = True
                self._open |= t == self._think
            if not self._open or t in self._eos:
                continue
            if t == self._calls_begin:
                self._open = False
                continue
            self.reasoning_tokens += 1
            self._open = t != self._think_end
