"""Splits a streamed reply into reasoning and content.

Kimi's thinking models write `<think>…</think>` before the answer; reasoning also ends where a tool-call
section begins (that marker stays in the content, for the tool-call parser). When the generation
prompt already opened `<think>`, start with `in_reasoning=True`. Feed the reply's text without its
stop token; markers split across deltas are held back until they are decided.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid.tokenizer.specials import THINK, THINK_END, TOOL_CALLS_BEGIN, find_marker, held_suffix

_ENDS = (THINK_END, TOOL_CALLS_BEGIN)


@dataclass
class ReasoningDelta:
    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    def __init__(self, in_reasoning: bool = False):
        # "start": not yet known whether the reply opens with <think>.
        self._state = "reasoning" if in_reasoning else "start"
        self._buf = ""

    def feed(self, text: str) -> ReasoningDelta:
        self._buf += text
        out = ReasoningDelta()
        if self._state == "start":
            if self._buf.startswith(THINK):
                self._buf = self._buf[len(THINK):]
                self._state = "reasoning"
            elif THINK.startswith(self._buf):
                return out
            else:
                self._state = "content"
        if self._state == "reasoning":
            hit = find_marker(self._buf, _ENDS)
            if hit is None:
                cut = len(self._buf) - held_suffix(self._buf, _ENDS)
                out.reasoning, self._buf = self._buf[:cut], self._buf[cut:]
                return out
            i, marker = hit
            out.reasoning = self._buf[:i]
            self._buf = self._buf[i + len(THINK_END):] if marker == THINK_END else self._buf[i:]
            self._state = "content"
        out.content, self._buf = self._buf, ""
        return out

    def flush(self) -> ReasoningDelta:
        """The held-back tail, at the end of the reply."""
        tail, self._buf = self._buf, ""
        return ReasoningDelta(reasoning=tail) if self._state == "reasoning" else ReasoningDelta(content=tail)
