"""A request as the chat template reads it, whichever API it came through: OpenAI-style messages
(tool results as `tool` messages, assistant reasoning in `reasoning_content`), the function tools
declared to the model, the thinking switches, and what the reply is held to. Anthropic's Messages
and OpenAI's Responses requests are read into one; `Serving` renders and constrains it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from hybrid.server.errors import APIError

@dataclass
class Conversation:
    messages: list[dict]
    tools: list[dict]  # declared to the model (none with tool_choice none)
    thinking: bool
    preserve: bool
    forced: dict[str, dict] = field(default_factory=dict)  # tools a forced call may use: name -> input schema
    answer_schema: dict | None = None  # the JSON schema a structured answer must satisfy
    thinking_budget: int | None = None  # the most reasoning tokens, when bounded
    answer_param: str = "output_config.format.schema"  # the field that asked for the structured answer
    one_call: bool = False  # at most one tool call per reply (OpenAI's parallel_tool_calls false)


def check_schema(schema: dict[str, Any] | None, param: str) -> None:
    """A 400 naming `param` unless `schema`, a tool's, is a valid JSON Schema of an object."""
    if schema is None:
        raise APIError(400, f"{param}: a tool needs a schema of its input", param=param)
    error = _schema_error(json.dumps(schema, sort_keys=True))
    if error:
        raise APIError(400, f"{param}: {error}", param=param)


@functools.lru_cache(maxsize=1024)
def _schema_error(schema_json: str) -> str | None:
    """Why a tool's input schema is not a valid JSON Schema of an object (cached: agents send the same
    tools every turn)."""
    schema = json.loads(schema_json)
    if schema.get("type") != "object":
        return "the schema must have type \"object\""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        path = "".join(f"[{p!r}]" for p in e.absolute_path)
        return f"not a valid JSON Schema{' at ' + path if path else ''}: {e.message}"
    return None
