"""A reply's events as Anthropic content blocks, and the stream events that build them.

One block is open at a time: a new kind of event closes it and opens the next, so indices only
grow and no delta ever names a block that was not started. A thinking block is signed as it
closes (`signature_delta`). A tool call's arguments are sent as one `input_json_delta` when the
call is complete: the client then holds valid JSON at every step (arguments that do not parse
as an object become `{}`, so the tool reports the missing input and the agent can retry). The
arguments go out as the model wrote them, not re-encoded: a number beyond float range stays the
number the model wrote (re-encoding would turn it into null or the invalid `Infinity`).
"""

from __future__ import annotations

import json

from hybrid.server.reply import ReplyEvent
from hybrid.server.thinking_signature import ThinkingSigner
from hybrid.tokenizer import ReasoningDelta, TextDelta, ToolCallArgs, ToolCallEnd, ToolCallStart


class ContentBlocks:
    def __init__(self, signer: ThinkingSigner):
        self.content: list[dict] = []
        self._signer = signer
        self._open: str | None = None  # type of the last block, while it is open
        self._args = ""
        self._inputs: dict[int, str] = {}  # tool_use block index -> its input as JSON text

    def feed(self, events: list[ReplyEvent]) -> list[dict]:
        """Stream events (content_block_start / _delta / _stop) for reply events."""
        out: list[dict] = []
        for e in events:
            if isinstance(e, ReasoningDelta):
                self._ensure(out, {"type": "thinking", "thinking": "", "signature": ""})
                self.content[-1]["thinking"] += e.reasoning
                out.append(self._delta({"type": "thinking_delta", "thinking": e.reasoning}))
            elif isinstance(e, TextDelta):
                self._ensure(out, {"type": "text", "text": ""})
                self.content[-1]["text"] += e.text
                out.append(self._delta({"type": "text_delta", "text": e.text}))
            elif isinstance(e, ToolCallStart):
                self._start(out, {"type": "tool_use", "id": e.id, "name": e.name, "input": {}})
                self._args = ""
            elif isinstance(e, ToolCallArgs) and self._open == "tool_use":
                self._args += e.text
            elif isinstance(e, ToolCallEnd) and self._open == "tool_use":
                self._close(out)
        return out

    def close(self) -> list[dict]:
        """Events that close the block still open, at the end of the reply."""
        out: list[dict] = []
        self._close(out)
        return out

    def message_json(self, message: dict) -> str:
        """`message` (a Messages response without its content) as JSON, with the content."""
        blocks = []
        for i, block in enumerate(self.content):
            if i in self._inputs:
                head = json.dumps({k: v for k, v in block.items() if k != "input"}, ensure_ascii=False)
                blocks.append(f'{head[:-1]}, "input": {self._inputs[i]}}}')
            else:
                blocks.append(json.dumps(block, ensure_ascii=False))
        head = json.dumps({**message, "content": _CONTENT}, ensure_ascii=False)
        return head.replace(json.dumps(_CONTENT), "[" + ", ".join(blocks) + "]", 1)

    def _ensure(self, out: list[dict], block: dict) -> None:
        if self._open != block["type"]:
            self._start(out, block)

    def _start(self, out: list[dict], block: dict) -> None:
        self._close(out)
        self.content.append(block)
        self._open = block["type"]
        out.append({"type": "content_block_start", "index": len(self.content) - 1, "content_block": dict(block)})

    def _close(self, out: list[dict]) -> None:
        block = self.content[-1] if self._open else None
        if block is None:
            return
        if self._open == "thinking":
            block["signature"] = self._signer.sign(block["thinking"])
            out.append(self._delta({"type": "signature_delta", "signature": block["signature"]}))
        elif self._open == "tool_use":
            text = _arguments(self._args)
            block["input"] = json.loads(text)
            self._inputs[len(self.content) - 1] = text
            out.append(self._delta({"type": "input_json_delta", "partial_json": text}))
        out.append({"type": "content_block_stop", "index": len(self.content) - 1})
        self._open = None

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta}


_CONTENT = "\0content\0"  # stands for the content list until it is spliced in


def _arguments(text: str) -> str:
    """The call's arguments if they are one JSON object (standard JSON: no NaN), else `{}`."""
    try:
        value = json.loads(text, parse_constant=_refuse)
    except ValueError:
        return "{}"
    return text.strip() if isinstance(value, dict) else "{}"


def _refuse(constant: str):
    raise ValueError(f"{constant} is not JSON")
