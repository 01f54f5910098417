"""A reply's events as Responses output items, and the stream events that build them.

One item is open at a time: a new kind of event closes it and opens the next, so output indices only
grow and no delta ever names an item that was not added. Each item's events run as OpenAI's do:

- reasoning: `output_item.added`, `content_part.added` (a `reasoning_text` part),
  `reasoning_text.delta`..., `reasoning_text.done`, `content_part.done`, `output_item.done`. The
  reasoning is returned as it is (`content`), not summarized (`summary` stays empty), and no
  `encrypted_content` is written: sent back, the text itself is what the next turn reads.
- message: `output_item.added`, `content_part.added` (an `output_text` part), `output_text.delta`...
  (with the tokens' log-probabilities when asked), `output_text.done`, `content_part.done`,
  `output_item.done`.
- function_call: `output_item.added`, `function_call_arguments.delta`...,
  `function_call_arguments.done`, `output_item.done`; a namespaced function comes back as its
  `name` and `namespace`.

The caller numbers the events (`sequence_number`) and wraps them in the response's own events.
"""

from __future__ import annotations

import copy
import uuid

from hybrid.server.openai_schema import TokenLogprobOut
from hybrid.server.reply import ReplyEvent
from hybrid.tokenizer import ReasoningDelta, TextDelta, ToolCallArgs, ToolCallEnd, ToolCallStart


class OutputItems:
    def __init__(self, names: dict[str, tuple[str | None, str]]):
        """names: a function's name as the model sees it -> (namespace, name) as the client declared it."""
        self.items: list[dict] = []
        self._names = names
        self._open: str | None = None  # type of the last item, while it is open
        self._logprobs: list[dict] = []  # of tokens whose text has not been sent yet
        self._calls: list[dict] = []  # the reply's calls as the chat template reads them

    def feed(self, events: list[ReplyEvent], logprobs: list[TokenLogprobOut] = ()) -> list[dict]:
        """Stream events for reply events; `logprobs`: those of the tokens the events came from."""
        self._logprobs += [e.model_dump() for e in logprobs]
        out: list[dict] = []
        for e in events:
            if isinstance(e, ReasoningDelta):
                self._ensure(out, "reasoning")
                self._part()["text"] += e.reasoning
                out.append(self._event("response.reasoning_text.delta", content_index=0, delta=e.reasoning))
                self._logprobs = []
            elif isinstance(e, TextDelta):
                self._ensure(out, "message")
                part, logprobs = self._part(), self._logprobs
                part["text"] += e.text
                part["logprobs"] += logprobs
                out.append(self._event("response.output_text.delta", content_index=0, delta=e.text, logprobs=logprobs))
                self._logprobs = []
            elif isinstance(e, ToolCallStart):
                namespace, name = self._names.get(e.name, (None, e.name))
                item = {"id": _id("fc"), "type": "function_call", "status": "in_progress", "call_id": e.id,
                        "name": name, "arguments": ""}
                if namespace:
                    item["namespace"] = namespace
                self._start(out, item)
                self._calls.append({"id": e.id, "type": "function", "function": {"name": e.name, "arguments": ""}})
                self._logprobs = []
            elif isinstance(e, ToolCallArgs) and self._open == "function_call":
                self.items[-1]["arguments"] += e.text
                self._calls[-1]["function"]["arguments"] += e.text
                out.append(self._event("response.function_call_arguments.delta", delta=e.text))
            elif isinstance(e, ToolCallEnd) and self._open == "function_call":
                self._close(out, "completed")
        return out

    def close(self, status: str = "completed") -> list[dict]:
        """Events that close the item still open, at the end of the reply (`status` "incomplete" when
        the reply was cut short)."""
        out: list[dict] = []
        self._close(out, status)
        return out

    def assistant_message(self) -> dict:
        """The reply as the chat template reads an assistant turn (for continuing the conversation)."""
        texts = {kind: "".join(p["text"] for item in self.items if item["type"] == kind for p in item["content"])
                 for kind in ("reasoning", "message")}
        message = {"role": "assistant", "content": texts["message"]}
        if texts["reasoning"]:
            message["reasoning_content"] = texts["reasoning"]
        if self._calls:
            message["tool_calls"] = self._calls
        return message

    def _ensure(self, out: list[dict], kind: str) -> None:
        if self._open == kind:
            return
        if kind == "reasoning":
            item = {"id": _id("rs"), "type": "reasoning", "summary": [], "content": [], "encrypted_content": None,
                    "status": "in_progress"}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"id": _id("msg"), "type": "message", "role": "assistant", "status": "in_progress",
                    "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self._start(out, item)
        item["content"].append(part)
        out.append(self._event("response.content_part.added", content_index=0, part=copy.deepcopy(part)))

    def _start(self, out: list[dict], item: dict) -> None:
        self._close(out, "completed")
        self.items.append(item)
        self._open = item["type"]
        out.append({"type": "response.output_item.added", "output_index": len(self.items) - 1,
                    "item": copy.deepcopy(item)})

    def _close(self, out: list[dict], status: str) -> None:
        if self._open is None:
            return
        item = self.items[-1]
        if self._open == "function_call":
            out.append(self._event("response.function_call_arguments.done", arguments=item["arguments"]))
        else:
            part = self._part()
            if self._open == "reasoning":
                out.append(self._event("response.reasoning_text.done", content_index=0, text=part["text"]))
            else:
                part["logprobs"] += self._logprobs  # of tokens that added no text (their text came whole before)
                self._logprobs = []
                out.append(self._event("response.output_text.done", content_index=0, text=part["text"],
                                       logprobs=part["logprobs"]))
            out.append(self._event("response.content_part.done", content_index=0, part=part))
        item["status"] = status
        out.append({"type": "response.output_item.done", "output_index": len(self.items) - 1, "item": item})
        self._open = None

    def _part(self) -> dict:
        return self.items[-1]["content"][0]

    def _event(self, kind: str, **fields) -> dict:
        return {"type": kind, "item_id": self.items[-1]["id"], "output_index": len(self.items) - 1, **fields}


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
