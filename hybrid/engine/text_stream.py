"""A sequence's text as it is generated, cut at the first stop string.

Text that could still grow into a stop string is held back until the next token decides it, so a
client never sees part of a stop string, and the stop string itself is never sent.
"""

from __future__ import annotations

from hybrid.tokenizer import Detokenizer
from hybrid.tokenizer.specials import find_marker, held_suffix


class TextStream:
    def __init__(self, detokenizer: Detokenizer, stop: list[str]):
        self._detokenizer = detokenizer
        self._stop = tuple(s for s in stop if s)
        self._held = ""

    def feed(self, token_id: int) -> tuple[str, bool]:
        """(text now safe to send, whether a stop string was reached)."""
        text = self._held + self._detokenizer.feed(token_id)
        if not self._stop:
            return text, False
        hit = find_marker(text, self._stop)
        if hit is not None:
            self._held = ""
            return text[:hit[0]], True
        cut = len(text) - held_suffix(text, self._stop)
        self._held = text[cut:]
        return text[:cut], False

    def flush(self) -> str:
        """Everything still held, at the end of the sequence."""
        text, self._held = self._held + self._detokenizer.flush(), ""
        return text
