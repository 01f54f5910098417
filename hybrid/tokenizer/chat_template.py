"""Kimi's chat template, and rendering any checkpoint's template so that message text cannot forge markup.

Before rendering, every string that comes from the caller has the first characters of the special tokens
(`<` and `[` for Kimi) hidden behind an escape; the template's own markup is left as it is. After
rendering, a special-token string can therefore only begin where the template itself wrote it; the text
is cut at those, and the escapes are undone only inside the plain-text pieces between them.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Kimi K2.5's template (turn markup, `tool_declare`, `## Return of {id}`, `<think>` handling) with K2.6's
# `preserve_thinking` switch. Assistant turns up to the last one without tool calls lose their
# reasoning (`<think></think>`) unless `preserve_thinking`; `thinking=false` empties it everywhere and
# ends the generation prompt with `<think></think>` instead of an open `<think>`. Content parts other
# than text are not rendered: this runtime serves the text model.
KIMI_CHAT_TEMPLATE = r"""
{%- macro render_content(msg) -%}
  {%- set c = msg.get('content') -%}
  {%- if c is string -%}
    {{- c -}}
  {%- elif c is not none -%}
    {%- for part in c -%}
      {%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}
    {%- endfor -%}
  {%- endif -%}
{%- endmacro -%}

{%- macro set_roles(message) -%}
  {%- set role_name = message.get('name') or message['role'] -%}
  {%- if message['role'] == 'user' -%}
    <|im_user|>{{- role_name -}}<|im_middle|>
  {%- elif message['role'] == 'assistant' -%}
    <|im_assistant|>{{- role_name -}}<|im_middle|>
  {%- else -%}
    <|im_system|>{{- role_name -}}<|im_middle|>
  {%- endif -%}
{%- endmacro -%}

{%- macro render_toolcalls(message) -%}
  <|tool_calls_section_begin|>
  {%- for tool_call in message['tool_calls'] -%}
    <|tool_call_begin|>{{- tool_call['id'] -}}<|tool_call_argument_begin|>
    {%- if tool_call['function']['arguments'] is string -%}
      {{- tool_call['function']['arguments'] -}}
    {%- else -%}
      {{- tool_call['function']['arguments'] | tojson -}}
    {%- endif -%}
    <|tool_call_end|>
  {%- endfor -%}
  <|tool_calls_section_end|>
{%- endmacro -%}

{%- set ns = namespace(last_non_tool_call_assistant_msg=-1) -%}
{%- if not preserve_thinking -%}
  {%- for idx in range(messages|length - 1, -1, -1) -%}
    {%- if messages[idx]['role'] == 'assistant' and not messages[idx].get('tool_calls') -%}
      {%- set ns.last_non_tool_call_assistant_msg = idx -%}
      {%- break -%}
    {%- endif -%}
  {%- endfor -%}
{%- endif -%}

{%- if tools -%}
  <|im_system|>tool_declare<|im_middle|>
  {%- if tools_ts_str -%}{{- tools_ts_str -}}{%- else -%}{{- tools | tojson(separators=(',', ':')) -}}{%- endif -%}
  <|im_end|>
{%- endif -%}
{%- if messages|length == 0 or messages[0]['role'] != 'system' -%}
  <|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>
{%- endif -%}

{%- for message in messages -%}
  {{- set_roles(message) -}}
  {%- if message['role'] == 'assistant' -%}
    {%- if loop.index0 <= ns.last_non_tool_call_assistant_msg or thinking is false -%}
      <think></think>
    {%- else -%}
      <think>{{- message.get('reasoning_content') or '' -}}</think>
    {%- endif -%}
    {{- render_content(message) -}}
    {%- if message.get('tool_calls') -%}{{- render_toolcalls(message) -}}{%- endif -%}
  {%- elif message['role'] == 'tool' -%}
    ## Return of {{ message['tool_call_id'] }}
{{ render_content(message) }}
  {%- else -%}
    {{- render_content(message) -}}
  {%- endif -%}
  <|im_end|>
{%- endfor -%}

{%- if add_generation_prompt -%}
  <|im_assistant|>assistant<|im_middle|>
  {%- if thinking is false -%}<think></think>{%- else -%}<think>{%- endif -%}
{%- endif -%}
"""

ESC = "\ufdd0"  # a Unicode noncharacter; caller text that holds it is escaped too


class Escaper:
    """Hides chosen characters of caller-supplied strings as ESC + digit, reversibly."""

    def __init__(self, chars: str):
        order = ESC + "".join(sorted(set(chars) - {ESC}))
        self._table = str.maketrans({c: ESC + chr(0x30 + i) for i, c in enumerate(order)})
        self._back = {chr(0x30 + i): c for i, c in enumerate(order)}
        self._pattern = re.compile(ESC + "(.)", re.S)

    def escape(self, obj: Any) -> Any:
        """`obj` with every string in it (dict keys too) escaped. Only JSON-like values are accepted:
        anything else could print unescaped text into the prompt."""
        if isinstance(obj, str):
            return obj.translate(self._table)
        if isinstance(obj, dict):
            return {self.escape(k): self.escape(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.escape(v) for v in obj]
        if obj is None or isinstance(obj, (bool, int, float)):
            return obj
        raise TypeError(f"chat template data must be JSON-like, got {type(obj).__name__}")

    def unescape(self, text: str) -> str:
        return self._pattern.sub(lambda m: self._back.get(m.group(1), m.group(0)), text)


def deep_sort(obj: Any) -> Any:
    """Dicts with sorted keys, recursively: Kimi's tokenizer declares tools this way."""
    if isinstance(obj, dict):
        return {k: deep_sort(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list):
        return [deep_sort(v) for v in obj]
    return obj


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Hugging Face's `tojson`: plain json.dumps (Jinja's own would HTML-escape and takes no separators).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str):
    raise TemplateError(message)


@functools.lru_cache(maxsize=8)
def compile_template(source: str):
    """The template as Hugging Face runs chat templates: sandboxed, trimmed blocks, loop controls."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env.from_string(source)
