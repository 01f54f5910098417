"""An OpenAI Responses request as the chat template reads a conversation; checked on the way, each
fault a 400 naming its field.

- `instructions` is a system turn ahead of everything, for this request only (as OpenAI: it is not
  carried over by `previous_response_id`); `system` and `developer` messages are system turns where
  they stand. The turns of the response named by `previous_response_id` come first.
- An assistant turn gathers the items the model wrote: `reasoning` (its text, or its summary when
  that is all there is), assistant `message` text and `function_call`s, until the next item of
  another kind. Whether earlier turns' reasoning reaches the prompt is the chat template's choice:
  Kimi keeps it only within the current tool-call loop, all of it with `thinking.preserve`.
- `function_call_output` becomes a tool result; its `call_id` must answer an earlier call.
- Images and files are refused (400): the model reads text only.
- Function tools are declared to the model; a namespace's functions as `{namespace}.{name}` (a name
  no plain function can have: OpenAI's function names are letters, digits, `_` and `-`).
  OpenAI's built-in tools (web search, file search, computer use, code interpreter, ...) are refused:
  this server runs no tools of its own.
- `reasoning.effort` `none` and `minimal` answer without thinking, `low` thinks for at most a quarter
  of `max_output_tokens`; a forced call or a structured answer is written without thinking.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybrid.server.conversation import Conversation, check_schema
from hybrid.server.errors import APIError
from hybrid.server.responses_schema import (AllowedTools, FilePart, FunctionCallItem, FunctionCallOutputItem,
                                            FunctionChoice, FunctionTool, ImagePart, MessageItem, NamespaceTool,
                                            ReasoningItem, RefusalPart, ResponsesRequest, TextPart, Unknown)

SEPARATOR = "."  # between a namespace and its function's name, in the name the model sees
LOGPROBS = "message.output_text.logprobs"
BUILT_IN = {"web_search": "web search", "web_search_preview": "web search", "file_search": "file search",
            "computer_use_preview": "computer use", "computer": "computer use", "code_interpreter": "code interpreter",
            "image_generation": "image generation", "mcp": "remote MCP", "local_shell": "local shell",
            "shell": "shell", "apply_patch": "apply patch", "tool_search": "tool search"}
ITEMS = "message, function_call, function_call_output and reasoning"


@dataclass
class ResponsesInput:
    conversation: Conversation  # what the prompt is rendered from
    turn: list[dict]  # this request's own messages (no instructions), kept with its reply for continuations
    names: dict[str, tuple[str | None, str]]  # a function's name as the model sees it -> (namespace, name)
    logprobs: int | None  # alternatives to report with each output token's log-probability; None: none


def read_request(body: ResponsesRequest, history: list[dict]) -> ResponsesInput:
    """`history`: the messages of the conversation `previous_response_id` continues."""
    for field, value in (("background", body.background), ("conversation", body.conversation),
                         ("prompt", body.prompt)):
        if value:
            raise APIError(400, f"{field} is not supported by this server", param=field)
    tools, schemas, names = _tools(body)
    forced = _forced(body, schemas)
    if body.tool_choice == "none":
        tools = []
    elif isinstance(body.tool_choice, AllowedTools):
        allowed = set(_allowed(body.tool_choice, schemas))
        tools = [t for t in tools if t["function"]["name"] in allowed]
    turn = _messages(body, history)
    fmt = body.text.format if body.text else None
    answer_schema = answer_param = None
    if fmt is not None and fmt.type == "json_schema":
        if fmt.schema_ is None:
            raise APIError(400, "text.format.schema is required with type json_schema", param="text.format.schema")
        answer_schema, answer_param = fmt.schema_, "text.format.schema"
    elif fmt is not None and fmt.type == "json_object":
        answer_schema, answer_param = {"type": "object"}, "text.format"
    thinking, preserve = body.thinking_switches()
    effort = body.reasoning.effort if body.reasoning else None
    budget = max(1, body.max_output_tokens // 4) if effort == "low" and body.max_output_tokens else None
    thinking = thinking and effort not in ("none", "minimal") and not forced and answer_schema is None
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    conversation = Conversation(system + history + turn, tools, thinking, preserve, forced, answer_schema, budget,
                                answer_param or "text.format", one_call=not body.parallel_tool_calls)
    logprobs = (body.top_logprobs or 0) if LOGPROBS in body.include or body.top_logprobs is not None else None
    return ResponsesInput(conversation, turn, names, logprobs)


def _tools(body: ResponsesRequest) -> tuple[list[dict], dict[str, dict], dict[str, tuple[str | None, str]]]:
    """(the tools in the chat template's shape, each one's parameter schema, the names the model sees)."""
    tools, schemas, names = [], {}, {}

    def declare(tool: FunctionTool, namespace: NamespaceTool | None, param: str) -> None:
        parameters = tool.parameters if tool.parameters is not None else {"type": "object", "properties": {}}
        check_schema(parameters, param + ".parameters")
        name = f"{namespace.name}{SEPARATOR}{tool.name}" if namespace else tool.name
        description = "\n".join(d for d in (namespace and namespace.description, tool.description) if d)
        tools.append({"type": "function", "function": {"name": name, "description": description,
                                                       "parameters": parameters}})
        schemas[name], names[name] = parameters, (namespace and namespace.name, tool.name)

    for i, tool in enumerate(body.tools):
        if isinstance(tool, FunctionTool):
            declare(tool, None, f"tools.{i}")
        elif isinstance(tool, NamespaceTool):
            for j, inner in enumerate(tool.tools):
                if isinstance(inner, Unknown):
                    raise APIError(400, f"tools.{i}.tools.{j}: a namespace holds function tools here, not "
                                        f"{inner.type!r}", param=f"tools.{i}.tools.{j}.type")
                declare(inner, tool, f"tools.{i}.tools.{j}")
        else:
            raise _unsupported_tool(tool.type, f"tools.{i}")
    return tools, schemas, names


def _unsupported_tool(kind: str, param: str) -> APIError:
    if kind in BUILT_IN:
        hint = " (in Codex: web_search = \"disabled\" in config.toml)" if kind.startswith("web_search") else ""
        return APIError(400, f"{param}: {kind!r} is one of OpenAI's built-in tools ({BUILT_IN[kind]}), which this "
                             f"server does not offer: it runs no tools of its own; leave it out{hint}",
                        param=param + ".type")
    return APIError(400, f"{param}: tools of type {kind!r} are not supported; this server reads function and "
                         "namespace tools", param=param + ".type")


def _forced(body: ResponsesRequest, schemas: dict[str, dict]) -> dict[str, dict]:
    """The tools a forced call may use (none unless tool_choice forces one)."""
    choice = body.tool_choice
    if isinstance(choice, Unknown):
        raise _unsupported_tool(choice.type, "tool_choice")
    if choice == "required" or isinstance(choice, AllowedTools) and choice.mode == "required":
        names = _allowed(choice, schemas) if isinstance(choice, AllowedTools) else list(schemas)
        if not names:
            raise APIError(400, "tool_choice required needs at least one function tool", param="tool_choice")
        return {name: schemas[name] for name in names}
    if isinstance(choice, FunctionChoice):
        if choice.name not in schemas:
            raise APIError(400, f"tool_choice names the function {choice.name!r}, which is not in tools",
                           param="tool_choice.name")
        return {choice.name: schemas[choice.name]}
    return {}


def _allowed(choice: AllowedTools, schemas: dict[str, dict]) -> list[str]:
    names = []
    for i, tool in enumerate(choice.tools):
        if tool.get("type") != "function":
            raise _unsupported_tool(str(tool.get("type")), f"tool_choice.tools.{i}")
        if tool.get("name") not in schemas:
            raise APIError(400, f"tool_choice.tools.{i} names the function {tool.get('name')!r}, which is not in "
                                "tools", param=f"tool_choice.tools.{i}.name")
        names.append(tool["name"])
    return names


def _messages(body: ResponsesRequest, history: list[dict]) -> list[dict]:
    out: list[dict] = []
    called = {c["id"] for m in history for c in m.get("tool_calls") or []}
    turn: dict | None = None  # the assistant turn being gathered

    def assistant() -> dict:
        nonlocal turn
        if turn is None:
            turn = {"role": "assistant", "content": ""}
            out.append(turn)
        return turn

    for i, item in enumerate(body.input):
        if isinstance(item, ReasoningItem):
            texts = [p.text for p in item.content] if item.content else [p.text for p in item.summary]
            if turn is not None and (turn["content"] or turn.get("tool_calls")):
                turn = None  # reasoning after the turn's answer opens the next turn
            message = assistant()
            message["reasoning_content"] = "\n".join(filter(None, [message.get("reasoning_content"), *texts]))
        elif isinstance(item, MessageItem) and item.role == "assistant":
            if turn is not None and turn.get("tool_calls"):
                turn = None
            message = assistant()
            text = _text(item.content, f"input.{i}.content")
            message["content"] = "\n".join(filter(None, [message["content"], text]))
        elif isinstance(item, FunctionCallItem):
            called.add(item.call_id)
            name = f"{item.namespace}{SEPARATOR}{item.name}" if item.namespace else item.name
            assistant().setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function", "function": {"name": name, "arguments": item.arguments}})
        elif isinstance(item, FunctionCallOutputItem):
            turn = None
            if item.call_id not in called:
                raise APIError(400, f"input.{i}: the function_call_output's call_id {item.call_id!r} answers no "
                                    "earlier function_call", param=f"input.{i}.call_id")
            out.append({"role": "tool", "tool_call_id": item.call_id,
                        "content": _text(item.output, f"input.{i}.output")})
        elif isinstance(item, MessageItem):
            turn = None
            out.append({"role": item.role, "content": _text(item.content, f"input.{i}.content")})
        else:
            raise APIError(400, f"input.{i}: items of type {item.type!r} are not supported; this server reads "
                                f"{ITEMS} items", param=f"input.{i}.type")
    return out


def _text(parts: list, param: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if isinstance(part, TextPart):
            texts.append(part.text)
        elif isinstance(part, RefusalPart):
            texts.append(part.refusal)
        elif isinstance(part, (ImagePart, FilePart)):
            raise APIError(400, f"{param}.{j}: a content part of type {part.type!r}: this model reads text only "
                                "(fix: send the content as input_text parts)", param=f"{param}.{j}.type")
        else:
            raise APIError(400, f"{param}.{j}: content parts of type {part.type!r} are not supported; this server "
                                "reads input_text, output_text and refusal", param=f"{param}.{j}.type")
    return "\n".join(texts)
