"""Anthropic's Messages API bodies, as far as this server reads and writes them.

Unknown fields are ignored (clients send `metadata`, `service_tier`, `cache_control` and newer
fields); wrong types and unknown content block types are refused, naming the field. A string
`system`, message `content` or tool-result `content` is read as one text block.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hybrid.server.openai_schema import INT32_MAX


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _blocks(value: Any) -> Any:
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


# ---- requests ---------------------------------------------------------------------------------

class TextBlock(Request):
    type: Literal["text"]
    text: str


class ImageBlock(Request):
    type: Literal["image"]
    source: dict[str, Any]


class DocumentBlock(Request):
    type: Literal["document"]
    source: dict[str, Any]
    title: str | None = None


class ToolUseBlock(Request):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(Request):
    type: Literal["tool_result"]
    tool_use_id: str
    content: list[Annotated[Union[TextBlock, ImageBlock, DocumentBlock], Field(discriminator="type")]] = []
    is_error: bool = False

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return [] if value is None else _blocks(value)


class ThinkingBlock(Request):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Request):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[Union[TextBlock, ImageBlock, DocumentBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock,
                               RedactedThinkingBlock], Field(discriminator="type")]


class Message(Request):
    """`system` messages in the conversation (Claude Code's `mid-conversation-system` beta) hold
    text only, and are rendered as system turns where they stand."""

    role: Literal["user", "assistant", "system"]
    content: list[ContentBlock]

    @field_validator("content", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _blocks(value)


class Tool(Request):
    """A client tool (no `type`, or "custom"); Anthropic's server tools (`web_search_...`) have a
    type of their own and no schema, and are not offered to the model."""

    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None

    @property
    def is_client_tool(self) -> bool:
        return self.type in (None, "custom")


class ToolChoice(Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(Request):
    """`preserve` is Moonshot's extension: earlier turns' reasoning stays in the prompt."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)
    preserve: bool | None = None


class OutputFormat(Request):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Request):
    """Structured outputs: the answer is JSON valid against `format.schema`. `effort` bounds the
    reasoning: `low` answers without thinking, `medium` thinks for at most a quarter of max_tokens,
    `high` and `max` as the thinking settings allow."""

    format: OutputFormat | None = None
    effort: Literal["low", "medium", "high", "max"] | None = None


class ThinkingTurns(Request):
    type: Literal["thinking_turns"]
    value: int = Field(ge=0)


class ClearThinking(Request):
    """Reasoning of all but the last `keep` assistant turns is left out of the prompt (default:
    the last turn's is kept; "all" keeps every turn's)."""

    type: Literal["clear_thinking_20251015"]
    keep: Literal["all"] | ThinkingTurns = ThinkingTurns(type="thinking_turns", value=1)


class ClearToolUses(Request):
    """Accepted; this server does not clear tool results (a prompt that does not fit its context
    is refused with the limit instead)."""

    type: Literal["clear_tool_uses_20250919"]


class ContextManagement(Request):
    edits: list[Annotated[Union[ClearThinking, ClearToolUses], Field(discriminator="type")]] = []


class CountTokensRequest(Request):
    model: str
    messages: list[Message] = Field(min_length=1)
    system: list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    context_management: ContextManagement | None = None

    @field_validator("system", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _blocks(value)


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stream: bool = False
    stop_sequences: list[str] | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=INT32_MAX)
    metadata: dict[str, Any] | None = None


# ---- responses --------------------------------------------------------------------------------

class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None = None
    stop_sequence: str | None = None
    usage: Usage


class CountTokensResponse(BaseModel):
    input_tokens: int
