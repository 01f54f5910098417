"""OpenAI's request and response bodies, as far as this server reads and writes them.

Unknown request fields are ignored (clients send many); fields of the wrong type are refused.
`thinking` and `chat_template_kwargs` are the extensions clients send through `extra_body`;
`top_k`, `min_p` and `stop_token_ids` are the usual sampling extensions.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer


# Integers that reach the sampler's tensors and generators must fit them (a larger seed is a 400,
# not a 500); counts such as max_tokens are clamped to what the context holds instead.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
INT32_MAX = (1 << 31) - 1  # top_k: anything above the vocabulary means all of it


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---- requests ---------------------------------------------------------------------------------

class FunctionCall(Request):
    name: str
    arguments: str | dict[str, Any] = ""


class ToolCall(Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(Request):
    type: str
    text: str | None = None


class ChatMessage(Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None


class FunctionDef(Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoice(Request):
    type: Literal["function"] = "function"
    function: dict[str, str]


class StreamOptions(Request):
    include_usage: bool = False


class JsonSchemaFormat(Request):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class Thinking(Request):
    type: Literal["enabled", "disabled", "adaptive"] = "enabled"
    preserve: bool | None = None


class ThinkingSwitches(Request):
    """Moonshot's extensions (sent through `extra_body`): `thinking: {type, preserve}`, or
    `chat_template_kwargs: {thinking, preserve_thinking}`."""

    thinking: Thinking | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def thinking_switches(self) -> tuple[bool, bool]:
        """(thinking, preserve_thinking). Thinking is on unless turned off: Moonshot's default for Kimi's
        thinking models on its OpenAI-compatible API (the Anthropic endpoint keeps Anthropic's default,
        off; see docs/claude-code.md)."""
        thinking, preserve = True, False
        if self.thinking is not None:
            thinking, preserve = self.thinking.type != "disabled", bool(self.thinking.preserve)
        kwargs = self.chat_template_kwargs or {}
        for key in ("thinking", "enable_thinking"):
            if key in kwargs:
                value = kwargs[key]
                thinking = value.get("type") != "disabled" if isinstance(value, dict) else bool(value)
        return thinking, bool(kwargs.get("preserve_thinking", preserve))


class Sampling(Request):
    """Fields shared by chat and plain completions."""

    model: str
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=INT32_MAX)
    min_p: float = Field(0.0, ge=0, le=1)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None

    def logprob_count(self) -> int | None:
        """How many alternatives to report with each token's log-probability (None: no log-probabilities)."""
        return None


class ChatCompletionRequest(Sampling, ThinkingSwitches):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    @field_validator("logprobs")
    @classmethod
    def _no_prompt_logprobs(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("echo"):
            raise ValueError("logprobs with echo would need the prompt's log-probabilities, which this server "
                             "does not compute; send one or the other")
        return value

    def logprob_count(self) -> int | None:
        return self.logprobs


# ---- responses --------------------------------------------------------------------------------

class Sparse(BaseModel):
    """Serialized without its unset (None) fields: stream deltas carry only what changed."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class TopLogprob(BaseModel):
    token: str  # the token's text; `bytes:\xe2\x80` for a piece of a UTF-8 character
    logprob: float
    bytes: list[int]


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut]
    refusal: None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class FunctionCallOut(Sparse):
    name: str | None = None
    arguments: str = ""


class ToolCallOut(Sparse):
    index: int | None = None
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(Sparse):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hybrid"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
