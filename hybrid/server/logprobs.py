"""Tokens' log-probabilities as OpenAI's APIs return them.

The engine reports, for each sampled token, its log-probability and the most likely alternatives'
(see engine/sampler.py for the distribution). Here they become OpenAI's entries: the token as
text (`bytes:\\xe2\\x80` for a piece of a UTF-8 character, special tokens by name), its bytes, its
log-probability and the alternatives'. A stop token (`<|im_end|>`, `[EOS]`, `stop_token_ids`) ends
the reply without being part of it, and is left out, as OpenAI leaves its end token out.
"""

from __future__ import annotations

import codecs
from typing import Iterable

from hybrid.engine import RequestOutput
from hybrid.server.openai_schema import CompletionLogprobs, TokenLogprobOut, TopLogprob
from hybrid.tokenizer import Tokenizer
from hybrid.tokenizer.detokenizer import silent_ids


class Logprobs:
    def __init__(self, tokenizer: Tokenizer, stop_ids: Iterable[int] = ()):
        self._tokenizer = tokenizer
        self._stop = tokenizer.eos_ids | frozenset(stop_ids)
        self._silent = {name for name, i in tokenizer.special.items() if i in silent_ids(tokenizer)}

    def entries(self, out: RequestOutput) -> list[TokenLogprobOut]:
        """The entries of an output's tokens (none when the request did not ask)."""
        return [TokenLogprobOut(**self._entry(lp.token_id, lp.logprob),
                                top_logprobs=[TopLogprob(**self._entry(t, v)) for t, v in lp.top])
                for lp in out.logprobs or [] if lp.token_id not in self._stop]

    def _entry(self, token_id: int, logprob: float) -> dict:
        data = self._tokenizer.token_bytes(token_id)
        try:
            token = data.decode("utf-8")
        except UnicodeDecodeError:
            token = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
        return {"token": token, "logprob": logprob, "bytes": list(data)}


    def completion(self, entries: list[TokenLogprobOut], offset: int = 0) -> CompletionLogprobs:
        """The legacy completions shape of a choice's entries; text offsets count from `offset`, and
        special tokens that write no text take no room."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offsets = []
        for e in entries:
            offsets.append(offset)
            offset += 0 if e.token in self._silent else len(utf8.decode(bytes(e.bytes)))
        return CompletionLogprobs(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                                  top_logprobs=[{t.token: t.logprob for t in e.top_logprobs} for e in entries],
                                  text_offset=offsets)
