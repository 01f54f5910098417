"""Kimi's special tokens: their names, their place after the base vocabulary, and how to find them in
streamed text (where a marker may arrive split over several deltas)."""

from __future__ import annotations

N_SPECIAL = 256

BOS = "[BOS]"
EOS = "[EOS]"
IM_END = "<|im_end|>"
IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_SYSTEM = "<|im_system|>"
IM_MIDDLE = "<|im_middle|>"
TOOL_CALLS_BEGIN = "<|tool_calls_section_begin|>"
TOOL_CALLS_END = "<|tool_calls_section_end|>"
TOOL_CALL_BEGIN = "<|tool_call_begin|>"
TOOL_CALL_ARGS = "<|tool_call_argument_begin|>"
TOOL_CALL_END = "<|tool_call_end|>"
THINK = "<think>"
THINK_END = "</think>"

# Offsets from the first special id (= number of base tokens), as in Kimi K2 / K2.5's
# tokenizer_config.json. Ids not named here are `<|reserved_token_{id}|>`.
OFFSETS = {
    BOS: 0, EOS: 1, IM_END: 2, IM_USER: 3, IM_ASSISTANT: 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9,
    IM_SYSTEM: 10, TOOL_CALLS_BEGIN: 11, TOOL_CALLS_END: 12, TOOL_CALL_BEGIN: 13, TOOL_CALL_ARGS: 14,
    TOOL_CALL_END: 15, IM_MIDDLE: 17,
    "<|media_begin|>": 18, "<|media_content|>": 19, "<|media_end|>": 20, "<|media_pad|>": 21,
    THINK: 22, THINK_END: 23, "[UNK]": 254, "[PAD]": 255,
}


def reserved_name(token_id: int) -> str:
    return f"<|reserved_token_{token_id}|>"


def find_marker(text: str, markers: tuple[str, ...]) -> tuple[int, str] | None:
    """The earliest complete marker in `text` as (position, marker), or None."""
    best = None
    for m in markers:
        i = text.find(m)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, m)
    return best


def held_suffix(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that could still grow into a marker.

    A streaming parser keeps that tail back until the next delta decides it."""
    start = max(0, len(text) - max(len(m) for m in markers) + 1)
    for i in range(start, len(text)):
        tail = text[i:]
        if any(m.startswith(tail) for m in markers):
            return len(text) - i
    return 0
