"""OpenAI's Responses API bodies (`POST /v1/responses`), as far as this server reads and writes them.

Unknown top-level fields are ignored (clients send `prompt_cache_key`, `client_metadata`,
`safety_identifier`, `service_tier` and newer fields); wrong types are refused, naming the field.
Input items, their content parts, tools and tool choices are read by their `type`: each kind this
server reads has a model here, and every other kind is read as `Unknown`, so that
responses_input.py can refuse it with a message that names it. An input item without a `type` but
with a `role` is a message, as OpenAI reads it. A string `input` is one user message, and a string
message `content` or function output one text part.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag

from hybrid.server.openai_schema import ThinkingSwitches


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Unknown(Request):
    """A kind (of item, part, tool, tool choice) this server does not read."""

    type: str


def _by_type(known: set[str], default: str | None = None):
    """A discriminator: the value's `type` if this server reads it, else "unknown"."""
    def tag(value: Any) -> str:
        kind = value.get("type", default) if isinstance(value, dict) else getattr(value, "type", default)
        return kind if kind in known else "unknown"
    return Discriminator(tag)


def _union(*models: type[Request], default: str | None = None):
    """Models told apart by their `type` literal, with Unknown for any other type."""
    tags = {t: m for m in models for t in m.model_fields["type"].annotation.__args__}
    choices = [Annotated[m, Tag(t)] for t, m in tags.items()] + [Annotated[Unknown, Tag("unknown")]]
    return Annotated[Union[tuple(choices)], _by_type(set(tags), default)]


# ---- content parts ----------------------------------------------------------------------------

class TextPart(Request):
    type: Literal["input_text", "output_text"]
    text: str


class RefusalPart(Request):
    type: Literal["refusal"]
    refusal: str


class ImagePart(Request):
    type: Literal["input_image"]


class FilePart(Request):
    type: Literal["input_file"]
    filename: str | None = None


Part = _union(TextPart, RefusalPart, ImagePart, FilePart)


def _text_is(item: Callable[[str], dict]) -> BeforeValidator:
    """A string read as a list of one `item(string)`."""
    return BeforeValidator(lambda value: [item(value)] if isinstance(value, str) else value)


Parts = Annotated[list[Part], _text_is(lambda text: {"type": "input_text", "text": text})]


class SummaryText(Request):
    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningText(Request):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


# ---- input items ------------------------------------------------------------------------------

class MessageItem(Request):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Parts


class FunctionCallItem(Request):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    namespace: str | None = None


class FunctionCallOutputItem(Request):
    type: Literal["function_call_output"]
    call_id: str
    output: Parts


class ReasoningItem(Request):
    """The model's earlier reasoning: its text in `content` (as this server returns it), or only
    its `summary` (as other servers return it); `encrypted_content` is opaque and not read."""

    type: Literal["reasoning"]
    summary: list[SummaryText] = []
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None


Item = _union(MessageItem, FunctionCallItem, FunctionCallOutputItem, ReasoningItem, default="message")
Items = Annotated[list[Item], _text_is(lambda text: {"role": "user", "content": text})]


# ---- tools and tool choice --------------------------------------------------------------------

class FunctionTool(Request):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamespaceTool(Request):
    """Function tools grouped under a name (Codex sends its sub-agent tools so); the model calls
    them as `{namespace}.{name}`."""

    type: Literal["namespace"]
    name: str = Field(min_length=1)
    description: str = ""
    tools: list[_union(FunctionTool)]


Tool = _union(FunctionTool, NamespaceTool)


class FunctionChoice(Request):
    type: Literal["function"]
    name: str


class AllowedTools(Request):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: list[dict[str, Any]]


ToolChoice = Union[Literal["auto", "none", "required"], _union(FunctionChoice, AllowedTools)]


# ---- the request ------------------------------------------------------------------------------

class Reasoning(Request):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class TextFormat(Request):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(Request):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class StreamOptions(Request):
    include_obfuscation: bool | None = None


class ResponsesRequest(ThinkingSwitches):
    model: str | None = None
    input: Items = []
    instructions: str | None = None
    tools: list[Tool] = []
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    reasoning: Reasoning | None = None
    text: TextConfig | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    include: list[str] = []
    metadata: dict[str, str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = None
    conversation: Any = None
    prompt: Any = None
    user: str | None = None


# ---- the response -----------------------------------------------------------------------------

class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"] = "in_progress"
    completed_at: int | None = None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[dict[str, Any]] = []
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] = {}
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = {"format": {"type": "text"}}
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = []
    top_logprobs: int | None = None
    top_p: float | None = None
    truncation: str = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = {}
    background: bool = False
