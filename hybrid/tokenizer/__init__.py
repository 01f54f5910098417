"""Kimi's tokenizer, chat template, and the streaming parsers of its replies."""

from hybrid.tokenizer.detokenizer import Detokenizer
from hybrid.tokenizer.reasoning import ReasoningDelta, ReasoningParser
from hybrid.tokenizer.tokenizer import Tokenizer
from hybrid.tokenizer.tool_calls import (Event, TextDelta, ToolCallArgs, ToolCallEnd, ToolCallParser, ToolCallStart,
                                         coalesce)
from hybrid.tokenizer.vocab import write_tokenizer

__all__ = ["Detokenizer", "Event", "ReasoningDelta", "ReasoningParser", "TextDelta", "Tokenizer", "ToolCallArgs",
           "ToolCallEnd", "ToolCallParser", "ToolCallStart", "coalesce", "write_tokenizer"]
