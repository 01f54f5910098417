"""Ids to text one at a time, for streaming: a character split over several tokens is held back until
its last byte arrives, so no delta ever carries half of it (or a U+FFFD in its place). Special
tokens that mean nothing in a reply (reserved ones, [BOS], padding) are dropped; the markers the
reasoning and tool-call parsers read are kept."""

from __future__ import annotations

import codecs

from hybrid.tokenizer.tokenizer import Tokenizer


class Detokenizer:
    """Feed ids as they are sampled; each call returns the text that is now complete."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._dropped = silent_ids(tokenizer)

    def feed(self, token_id: int) -> str:
        if token_id in self._dropped:
            return ""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """What is left at the end of the sequence (a truncated character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def silent_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """The special tokens that write no text: all but the markers the parsers read."""
    markers = tokenizer.tool_call_ids | {tokenizer.think_start_id, tokenizer.think_end_id}
    return frozenset(tokenizer.special.values()) - markers
