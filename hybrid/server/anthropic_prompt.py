"""An Anthropic Messages request as the chat template reads a conversation: OpenAI-style messages
(tool results as `tool` messages, assistant reasoning in `reasoning_content`), function tools, and
the thinking switches; checked on the way, each fault a 400 naming its field.

Thinking is on for `enabled` and `adaptive`, off otherwise, for `output_config.effort` `low`, and
whenever the reply is constrained (tool_choice forcing a call, or `output_config.format` asking for
JSON); effort `medium` caps it at a quarter of max_tokens. Earlier turns' reasoning reaches the
prompt only when its signature verifies, when `context_management`'s `clear_thinking` edit keeps
that turn, and then as the chat template decides (all of it with `preserve`). `system` messages
inside the conversation are system turns where they stand. Documents with a text source are read
as text; images and other documents are refused (400): the model reads text only, and answering
without what the client sent would answer another question.
"""

from __future__ import annotations

import json

from hybrid.server.anthropic_schema import (ClearThinking, CountTokensRequest, DocumentBlock, ImageBlock,
                                            MessagesRequest, RedactedThinkingBlock, TextBlock, ThinkingBlock,
                                            ToolResultBlock, ToolUseBlock)
from hybrid.server.conversation import Conversation, check_schema
from hybrid.server.errors import APIError
from hybrid.server.thinking_signature import ThinkingSigner


def read_conversation(body: CountTokensRequest, signer: ThinkingSigner) -> Conversation:
    client_tools = [t for t in body.tools or [] if t.is_client_tool]
    for i, tool in enumerate(body.tools or []):
        if tool.is_client_tool:
            check_schema(tool.input_schema, f"tools.{i}.input_schema")
    choice = body.tool_choice.type if body.tool_choice else "auto"
    schemas = {t.name: t.input_schema for t in client_tools}
    forced = {}
    if choice == "any":
        if not schemas:
            raise APIError(400, "tool_choice any needs at least one tool", param="tool_choice")
        forced = schemas
    elif choice == "tool":
        name = body.tool_choice.name
        if name not in schemas:
            raise APIError(400, f"tool_choice names the tool {name!r}, which is not in tools", param="tool_choice.name")
        forced = {name: schemas[name]}
    effort = body.output_config.effort if body.output_config else None
    thinking = body.thinking is not None and body.thinking.type != "disabled" and effort != "low"
    budget = None
    if isinstance(body, MessagesRequest) and body.thinking is not None and body.thinking.type == "enabled":
        budget = body.thinking.budget_tokens
        if budget is None:
            raise APIError(400, "thinking.budget_tokens is required when thinking is enabled",
                           param="thinking.budget_tokens")
        if budget >= body.max_tokens:
            raise APIError(400, f"thinking.budget_tokens ({budget}) must be less than max_tokens ({body.max_tokens})",
                           param="thinking.budget_tokens")
    if isinstance(body, MessagesRequest) and effort == "medium":
        budget = min(budget or body.max_tokens, max(1, body.max_tokens // 4))
    tools = [] if choice == "none" else [
        {"type": "function", "function": {"name": t.name, "description": t.description or "",
                                          "parameters": t.input_schema}} for t in client_tools]
    system = "\n".join(b.text for b in body.system or [])
    messages = ([{"role": "system", "content": system}] if body.system else []) + _messages(body, signer)
    fmt = body.output_config.format if body.output_config else None
    answer_schema = fmt.schema_ if fmt else None
    return Conversation(messages, tools, thinking and not forced and answer_schema is None,
                        bool(body.thinking and body.thinking.preserve), forced, answer_schema, budget)


def _reasoning_kept(body: CountTokensRequest) -> set[int]:
    """Indices of the assistant messages whose reasoning may reach the prompt, after the
    `clear_thinking` edit (every one without it)."""
    turns = [i for i, m in enumerate(body.messages) if m.role == "assistant"]
    for edit in body.context_management.edits if body.context_management else []:
        if isinstance(edit, ClearThinking) and edit.keep != "all":
            turns = turns[-edit.keep.value:] if edit.keep.value else []
    return set(turns)


def _messages(body: CountTokensRequest, signer: ThinkingSigner) -> list[dict]:
    out: list[dict] = []
    called: set[str] = set()
    kept = _reasoning_kept(body)
    for i, message in enumerate(body.messages):
        if message.role == "system":
            for j, block in enumerate(message.content):
                if not isinstance(block, TextBlock):
                    raise APIError(400, f"messages.{i}.content.{j}: a system message holds text blocks only, "
                                        f"not {block.type}", param=f"messages.{i}.content.{j}.type")
            out.append({"role": "system", "content": "\n".join(b.text for b in message.content)})
            continue
        if message.role == "assistant":
            text, reasoning, calls = [], [], []
            for j, block in enumerate(message.content):
                if isinstance(block, ThinkingBlock):
                    if i in kept and signer.verify(block.thinking, block.signature):
                        reasoning.append(block.thinking)
                elif isinstance(block, ToolUseBlock):
                    called.add(block.id)
                    calls.append({"id": block.id, "type": "function", "function": {
                        "name": block.name, "arguments": json.dumps(block.input, ensure_ascii=False)}})
                elif not isinstance(block, RedactedThinkingBlock):
                    text.append(_text(block, f"messages.{i}.content.{j}"))
            m = {"role": "assistant", "content": "\n".join(text)}
            if reasoning:
                m["reasoning_content"] = "\n".join(reasoning)
            if calls:
                m["tool_calls"] = calls
            out.append(m)
            continue
        text = []
        for j, block in enumerate(message.content):
            if isinstance(block, ToolResultBlock):
                if block.tool_use_id not in called:
                    raise APIError(400, f"tool_result block's tool_use_id {block.tool_use_id!r} matches no earlier "
                                        "tool_use block", param=f"messages.{i}.content.{j}.tool_use_id")
                if text:  # text before a tool result stays before it
                    out.append({"role": "user", "content": "\n".join(text)})
                    text = []
                content = "\n".join(_text(b, f"messages.{i}.content.{j}.content.{k}")
                                    for k, b in enumerate(block.content))
                out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": f"Error: {content}" if block.is_error else content})
            elif isinstance(block, (ToolUseBlock, ThinkingBlock, RedactedThinkingBlock)):
                raise APIError(400, f"a user message cannot hold a {block.type} block",
                               param=f"messages.{i}.content.{j}.type")
            else:
                text.append(_text(block, f"messages.{i}.content.{j}"))
        if text or not message.content:
            out.append({"role": "user", "content": "\n".join(text)})
    return out


def _text(block: TextBlock | ImageBlock | DocumentBlock, where: str) -> str:
    if isinstance(block, TextBlock):
        return block.text
    if isinstance(block, DocumentBlock) and block.source.get("type") == "text":
        return str(block.source.get("data", ""))
    what = "an image" if isinstance(block, ImageBlock) else f"a document of source type {block.source.get('type')!r}"
    raise APIError(400, f"{where}: {what}, which this model cannot read: it reads text only (fix: send text blocks, "
                        "or a document with a text source)", param=where)

