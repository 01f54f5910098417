"""What the chat APIs constrain, as grammars over Kimi's output; a thinking budget; one tool call.

A forced tool call is exactly one call in Kimi's syntax, its id numbered as the conversation's next
call and its arguments valid against the tool's schema; a JSON answer is one JSON value valid
against a schema. JSON is written compactly in `json.dumps`'s default style (`", "` and `": "`, no
other whitespace), as the chat template renders earlier calls' arguments. Both are answered with
thinking off: the prompt closes `<think></think>` before the grammar starts (Anthropic, too, does
not think before a forced tool call).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from hybrid.tokenizer import Tokenizer
from hybrid.tokenizer.specials import (TOOL_CALL_ARGS, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_CALLS_BEGIN,
                                       TOOL_CALLS_END)

# llguidance's JSON options: compact output in json.dumps's style; schema keywords it does not
# implement (formats, `not`, ...) are ignored rather than refused.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ", "lenient": True}


def tool_call_grammar(tools: dict[str, dict[str, Any]], index: int) -> str:
    """One call of one of `tools` (name -> JSON schema of its arguments), numbered `index`."""
    rules = [f"start: {TOOL_CALLS_BEGIN} call {TOOL_CALLS_END}",
             "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
    for i, (name, schema) in enumerate(tools.items()):
        rules.append(f"call_{i}: {TOOL_CALL_BEGIN} {json.dumps(f'functions.{name}:{index}')} {TOOL_CALL_ARGS} "
                     f"args_{i} {TOOL_CALL_END}")
        rules.append(f"args_{i}: %json {_json_options(schema)}")
    return "\n".join(rules)


def json_grammar(schema: dict[str, Any] | None) -> str:
    """One JSON value valid against `schema`; any JSON object without one."""
    return f"start: %json {_json_options({'type': 'object'} if schema is None else schema)}"


def _json_options(schema: dict[str, Any]) -> str:
    return json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False)


class ThinkingBudget:
    """Ends reasoning after `budget` tokens by forcing `</think>`, for a prompt that opened `<think>`.

    Reasoning also ends where the model closes it itself, starts a tool-call section, or stops."""

    def __init__(self, tokenizer: Tokenizer, budget: int):
        self.budget = budget
        self._think_end = tokenizer.think_end_id
        self._ends = {self._think_end, tokenizer.special.get(TOOL_CALLS_BEGIN), *tokenizer.eos_ids}
        self._seen = 0
        self._done = False

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not self._done:
            self._done = any(t in self._ends for t in output_ids[self._seen:])
            self._seen = len(output_ids)
        if self._done or len(output_ids) < self.budget:
            return logits
        forced = torch.full_like(logits, float("-inf"))
        forced[self._think_end] = 0
        return forced


class OneToolCall:
    """Closes the tool-call section after its first call (OpenAI's `parallel_tool_calls: false`)."""

    def __init__(self, tokenizer: Tokenizer):
        self._call_end = tokenizer.special.get(TOOL_CALL_END)
        self._section_end = tokenizer.special.get(TOOL_CALLS_END)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not output_ids or output_ids[-1] != self._call_end:
            return logits
        forced = torch.full_like(logits, float("-inf"))
        forced[self._section_end] = 0
        return forced
