"""Tool-call ids as clients know them.

Kimi numbers calls `functions.{name}:{idx}`, idx counting over the conversation; clients send ids
of their own (`toolu_...`, `call_...`), which `serving.kimi_tool_ids` rewrites before rendering. A
reply's calls go back with client-style ids derived from the conversation they answer and their
place in the reply: the same request gets the same ids, and a long agent loop never repeats one.
"""

from __future__ import annotations

import hashlib
from array import array
from typing import Callable


def reply_tool_ids(prefix: str, prompt_ids: list[int], choice: int = 0) -> Callable[[int], str]:
    """The id of a reply's call number `index`, e.g. `toolu_` + 24 hex digits."""
    conversation = hashlib.sha256(array("q", prompt_ids).tobytes() + choice.to_bytes(4, "little")).digest()
    return lambda index: prefix + hashlib.sha256(conversation + index.to_bytes(4, "little")).hexdigest()[:24]


def next_call_index(messages: list[dict]) -> int:
    """The idx Kimi gives the next call of an OpenAI-style conversation: calls so far."""
    return sum(len(m.get("tool_calls") or []) for m in messages)
