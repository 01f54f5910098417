"""Incremental parser of Kimi's tool calls:

    <|tool_calls_section_begin|><|tool_call_begin|>functions.{name}:{idx}<|tool_call_argument_begin|>{json}
    <|tool_call_end|> ... <|tool_calls_section_end|>

It turns streamed content into events: text, the start of a call (as soon as its id is complete), its
argument text as it arrives, and its end. Markup that does not parse, or that the reply cut short
before a call started, comes out as text, markers included: no character is lost. Feed the reply's
content without its stop token; feeding it token by token or all at once gives the same events once
`coalesce`d.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hybrid.tokenizer.specials import (TOOL_CALL_ARGS, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN,
                                       TOOL_CALLS_END, find_marker, held_suffix)

_MAX_ID = 512  # longer ids are taken for runaway output, not a call


@dataclass
class TextDelta:
    text: str


@dataclass
class ToolCallStart:
    index: int  # position of the call in this reply
    id: str     # as the model wrote it, e.g. "functions.get_weather:0"
    name: str


@dataclass
class ToolCallArgs:
    index: int
    text: str   # a fragment of the JSON arguments


@dataclass
class ToolCallEnd:
    index: int


Event = TextDelta | ToolCallStart | ToolCallArgs | ToolCallEnd


class ToolCallParser:
    def __init__(self):
        self._state = "text"  # text | section | id | args
        self._buf = ""        # received, not yet consumed
        self._pending = ""    # consumed markup of a section in which no call has started yet
        self._index = 0

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        events: list[Event] = []
        while getattr(self, "_" + self._state)(events):
            pass
        return coalesce(events)

    def flush(self) -> list[Event]:
        """Events for what is still held at the end of the reply."""
        events: list[Event] = []
        if self._state == "args":
            events += [ToolCallArgs(self._index, self._buf), ToolCallEnd(self._index)]
            self._index += 1
        else:
            events.append(TextDelta(self._pending + self._buf))
        self._state, self._buf, self._pending = "text", "", ""
        return coalesce(events)

    def _text(self, events: list[Event]) -> bool:
        hit = find_marker(self._buf, (TOOL_CALLS_BEGIN,))
        if hit is None:
            cut = len(self._buf) - held_suffix(self._buf, (TOOL_CALLS_BEGIN,))
            events.append(TextDelta(self._buf[:cut]))
            self._buf = self._buf[cut:]
            return False
        i = hit[0]
        events.append(TextDelta(self._buf[:i]))
        self._pending, self._buf = TOOL_CALLS_BEGIN, self._buf[i + len(TOOL_CALLS_BEGIN):]
        self._state = "section"
        return True

    def _section(self, events: list[Event]) -> bool:
        rest = self._buf.lstrip()
        space = self._buf[:len(self._buf) - len(rest)]
        if rest.startswith(TOOL_CALL_BEGIN):
            self._pending += space + TOOL_CALL_BEGIN
            self._buf, self._state = rest[len(TOOL_CALL_BEGIN):], "id"
            return True
        if rest.startswith(TOOL_CALLS_END):
            self._pending, self._buf, self._state = "", rest[len(TOOL_CALLS_END):], "text"
            return True
        if TOOL_CALL_BEGIN.startswith(rest) or TOOL_CALLS_END.startswith(rest):
            return False
        return self._fall_back(events)

    def _id(self, events: list[Event]) -> bool:
        i = self._buf.find(TOOL_CALL_ARGS)
        if i < 0:
            j = self._buf.find("<|")
            other_markup = j >= 0 and not TOOL_CALL_ARGS.startswith(self._buf[j:])
            if other_markup or len(self._buf) >= _MAX_ID + len(TOOL_CALL_ARGS):
                return self._fall_back(events)
            return False
        call_id = self._buf[:i].strip()
        name = call_id.removeprefix("functions.").rsplit(":", 1)[0]
        if not name or "<|" in call_id or i > _MAX_ID:
            return self._fall_back(events)
        events.append(ToolCallStart(self._index, call_id, name))
        self._pending, self._buf, self._state = "", self._buf[i + len(TOOL_CALL_ARGS):], "args"
        return True

    def _args(self, events: list[Event]) -> bool:
        ends = (TOOL_CALL_END, TOOL_CALLS_END)
        hit = find_marker(self._buf, ends)
        if hit is None:
            cut = len(self._buf) - held_suffix(self._buf, ends)
            events.append(ToolCallArgs(self._index, self._buf[:cut]))
            self._buf = self._buf[cut:]
            return False
        i, marker = hit
        events += [ToolCallArgs(self._index, self._buf[:i]), ToolCallEnd(self._index)]
        self._index += 1
        self._buf = self._buf[i + len(marker):]
        self._state = "section" if marker == TOOL_CALL_END else "text"
        return True

    def _fall_back(self, events: list[Event]) -> bool:
        """Not a tool call after all: the markup consumed so far is text; rescan the rest as text."""
        events.append(TextDelta(self._pending))
        self._pending, self._state = "", "text"
        return True


def coalesce(events: list[Event]) -> list[Event]:
    """Merge neighbouring text (and same-call argument) fragments; drop empty ones."""
    out: list[Event] = []
    for e in events:
        if isinstance(e, (TextDelta, ToolCallArgs)):
            if not e.text:
                continue
            last = out[-1] if out else None
            if type(last) is type(e) and getattr(last, "index", None) == getattr(e, "index", None):
                out[-1] = replace(last, text=last.text + e.text)
                continue
        out.append(e)
    return out
