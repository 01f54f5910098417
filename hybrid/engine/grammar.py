"""Constrained decoding: a logits processor that keeps one sequence inside a grammar, and that always
leaves itself room to finish the grammar within the sequence's token budget.

The grammar engine is llguidance (Lark grammars with `%json {schema}` and special tokens by name).
A grammar alone does not guarantee termination: a string or an array may grow until max_tokens
cuts the JSON in half. So every step the processor measures the *closing cost*, the number of
tokens a shortest-minded completion needs from here, by walking it on the matcher and rolling
back. The completion takes forced tokens as they come; where there is a choice it closes what is
open, knowing JSON: inside a string the quote, elsewhere the first of `}` `]` `,` `"` `1` `0`
that fits (else the lowest allowed token); and at the end the stop token. While the budget is
comfortably above that cost the model is free within the grammar; near the end only tokens after
which the completion still fits are allowed (the model's best few, each checked, and the
completion's own next token, which always fits). Far from the end the walk is skipped: the cost is
bounded by the last walk's plus MARGIN per token since.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import llguidance
import numpy as np
import torch

from hybrid.tokenizer import Tokenizer
from hybrid.tokenizer.specials import IM_END

# Within this many tokens of the closing cost, candidates are checked one by one. It must exceed
# what one token can add to the closing cost (a token opening an object with many required keys).
MARGIN = 32
CANDIDATES = 8  # the model's best allowed tokens checked near the end
CLOSERS = b'}],"10'  # tried in this order outside JSON strings
STRING_CLOSERS = b'"10'  # and inside them


class GrammarError(ValueError):
    """A grammar (or JSON schema) that llguidance cannot compile."""


@dataclass(frozen=True)
class GrammarVocab:
    """The tokenizer as llguidance sees it (every token's bytes, special tokens by name so a grammar
    can name `<|tool_call_begin|>`, the stop tokens it allows once a grammar is done), and the
    token of each single byte."""

    ll: llguidance.LLTokenizer
    byte_token: dict[int, int]


@functools.lru_cache(maxsize=4)
def grammar_vocab(tokenizer: Tokenizer) -> GrammarVocab:
    names = {i: name for name, i in tokenizer.special.items()}
    pieces = [names[i].encode() if i in names else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]

    class Wrapper:
        eos_token_id = min(tokenizer.eos_ids)
        bos_token_id = tokenizer.bos_id
        tokens = pieces
        special_token_ids = sorted(names)

        def __call__(self, text: bytes) -> list[int]:
            return tokenizer.encode(text.decode("utf-8", errors="replace"))

    ll = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Wrapper()), n_vocab=tokenizer.vocab_size,
                                eos_token=sorted(tokenizer.eos_ids))
    return GrammarVocab(ll, {p[0]: i for i, p in enumerate(pieces) if len(p) == 1 and i not in names})


class GrammarProcessor:
    """A LogitsProcessor (see SamplingParams) for one sequence: `max_tokens` is the sequence's whole
    budget of generated tokens, its stop token included."""

    def __init__(self, tokenizer: Tokenizer, grammar: str, max_tokens: int):
        vocab = grammar_vocab(tokenizer)
        self._matcher = llguidance.LLMatcher(vocab.ll, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())
        self._vocab = tokenizer.vocab_size
        self._stop = tokenizer.special.get(IM_END, min(tokenizer.eos_ids))  # end of turn
        self._byte_token = vocab.byte_token
        self._closers = {False: [self._byte_token[b] for b in CLOSERS],
                         True: [self._byte_token[b] for b in STRING_CLOSERS]}
        self._token_bytes = tokenizer.token_bytes
        self._budget = max_tokens
        self._consumed = 0
        self._json = JsonStrings()
        self._bound: int | None = None  # the closing cost is at most this (None: walk to know)

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        m = self._matcher
        if len(output_ids) > self._consumed:
            new = output_ids[self._consumed:]
            m.consume_tokens(new)
            self._json = self._json.after(self._bytes(new))
            self._consumed = len(output_ids)
            if self._bound is not None:
                self._bound += MARGIN * len(new)
        if m.is_error():  # a token the mask did not allow (another processor's doing): leave it be
            return logits
        remaining = self._budget - len(output_ids)
        if self._bound is not None and self._bound + MARGIN < remaining:
            return _apply(logits, self._mask(), self._vocab)
        cost, first = self._closing(remaining)
        self._bound = cost
        if cost + MARGIN < remaining:
            allowed = self._mask()
        elif cost >= remaining:  # only the completion itself still fits (or nothing does)
            allowed = [first]
        else:
            allowed = self._safe(logits, remaining, first)
        return _apply(logits, allowed, self._vocab)

    def _mask(self) -> np.ndarray:
        """Allowed tokens as a bool array over the tokenizer's vocabulary."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(bits, count=self._vocab, bitorder="little").view(np.bool_)

    def _safe(self, logits: torch.Tensor, remaining: int, first: int) -> list[int]:
        """The completion's next token and those of the model's best allowed tokens after which the
        completion still fits in what is left."""
        allowed = torch.from_numpy(self._mask()).to(logits.device)
        scores = logits[:self._vocab].masked_fill(~allowed, float("-inf"))
        k = min(CANDIDATES, int(allowed.sum()))
        keep = [first]
        for t in scores.topk(k).indices.tolist():
            if t != first and self._matcher.consume_token(t):
                if self._closing(remaining - 1, self._json.after(self._bytes([t])))[0] <= remaining - 1:
                    keep.append(t)
                self._matcher.rollback(1)
        return keep

    def _closing(self, limit: int, json: JsonStrings | None = None) -> tuple[int, int]:
        """(tokens the completion needs, its first token); a cost over `limit` is not walked further."""
        m = self._matcher
        json = json or self._json
        cost, first, taken = 0, None, 0
        try:
            while cost <= limit:
                if m.is_stopped():
                    return cost + 1, self._stop if first is None else first
                tokens = m.compute_ff_tokens() or [self._choice(json.in_string)]
                n = m.try_consume_tokens(tokens)
                if n == 0:
                    break
                json = json.after(self._bytes(tokens[:n]))
                taken += n
                cost += n
                first = tokens[0] if first is None else first
            return limit + 1, self._stop if first is None else first
        finally:
            m.rollback(taken)

    def _choice(self, in_string: bool) -> int:
        """The completion's pick where the grammar leaves a choice: a forced byte, a closer, or the
        lowest allowed token."""
        m = self._matcher
        forced = m.compute_ff_bytes()
        for t in ([self._byte_token[forced[0]]] if forced else []) + self._closers[in_string]:
            if m.validate_tokens([t]):
                return t
        allowed = np.flatnonzero(self._mask())
        return int(allowed[0]) if len(allowed) else self._stop

    def _bytes(self, tokens: list[int]) -> bytes:
        return b"".join(self._token_bytes(t) for t in tokens)


@dataclass(frozen=True)
class JsonStrings:
    """Whether the text so far ends inside a JSON string (and just after a backslash in one)."""

    in_string: bool = False
    escaped: bool = False

    def after(self, data: bytes) -> "JsonStrings":
        in_string, escaped = self.in_string, self.escaped
        for b in data:
            if escaped:
                escaped = False
            elif in_string and b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:  # quote
                in_string = not in_string
        return JsonStrings(in_string, escaped)


def _apply(logits: torch.Tensor, allowed: np.ndarray | list[int], vocab: int) -> torch.Tensor:
    """Logits with every token not allowed at -inf (ids past the tokenizer's vocabulary too)."""
    if isinstance(allowed, list):
        keep = torch.tensor(allowed, device=logits.device)
        out = torch.full_like(logits, float("-inf"))
        out[keep] = logits[keep]
        return out
    blocked = np.ones(logits.shape[-1], dtype=np.bool_)
    np.logical_not(allowed, out=blocked[:vocab])
    return logits.masked_fill_(torch.from_numpy(blocked).to(logits.device), float("-inf"))
