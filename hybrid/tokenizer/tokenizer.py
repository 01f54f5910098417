"""Kimi's tiktoken tokenizer, read from a checkpoint folder, and its chat template rendered into ids."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import tiktoken

from hybrid.tokenizer import specials as sp
from hybrid.tokenizer.chat_template import KIMI_CHAT_TEMPLATE, Escaper, compile_template, deep_sort

# `TikTokenTokenizer.pat_str` of Kimi's tokenization_kimi.py. The `&&` class intersections need
# tiktoken's regex engine (Python's `re` cannot read them).
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# As tokenization_kimi.py: tiktoken can fail on very long inputs and long runs of (non-)whitespace,
# so text is encoded in pieces cut at these lengths (which also keeps ids identical to Kimi's).
_MAX_CHARS = 400_000
_MAX_RUN = 25_000


class Tokenizer:
    """Byte-level BPE over Kimi's vocabulary; special tokens come only from the chat template."""

    def __init__(self, ranks: dict[bytes, int], special: dict[str, int], chat_template: str | None = None):
        self.special = special
        self.chat_template = chat_template or KIMI_CHAT_TEMPLATE
        self._enc = tiktoken.Encoding(name="kimi", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=special)
        self._special_re = re.compile("(" + "|".join(map(re.escape, sorted(special, key=len, reverse=True))) + ")")
        self._escaper = Escaper("".join({name[0] for name in special}))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Tokenizer":
        """Read `tiktoken.model` and `tokenizer_config.json` (and `chat_template.jinja` when present)."""
        folder = Path(folder)
        ranks = {}
        for line in (folder / "tiktoken.model").read_bytes().splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        n_base = len(ranks)
        special = {sp.reserved_name(i): i for i in range(n_base, n_base + sp.N_SPECIAL)}
        for i, token in config.get("added_tokens_decoder", {}).items():
            special.pop(sp.reserved_name(int(i)), None)
            special[token["content"]] = int(i)
        jinja = folder / "chat_template.jinja"
        template = jinja.read_text() if jinja.exists() else config.get("chat_template")
        return cls(ranks, special, template)

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    @property
    def bos_id(self) -> int:
        return self.special[sp.BOS]

    @property
    def eos_ids(self) -> frozenset[int]:
        """Ids that end generation: `<|im_end|>` (end of turn) and `[EOS]`."""
        return frozenset(self.special[n] for n in (sp.IM_END, sp.EOS) if n in self.special)

    @property
    def think_start_id(self) -> int | None:
        return self.special.get(sp.THINK)

    @property
    def think_end_id(self) -> int | None:
        return self.special.get(sp.THINK_END)

    @property
    def tool_call_ids(self) -> frozenset[int]:
        """The five markers of a tool-call section."""
        names = (sp.TOOL_CALLS_BEGIN, sp.TOOL_CALLS_END, sp.TOOL_CALL_BEGIN, sp.TOOL_CALL_ARGS, sp.TOOL_CALL_END)
        return frozenset(self.special[n] for n in names if n in self.special)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` as plain text: special-token strings in it stay ordinary characters."""
        ids: list[int] = []
        for piece in _pieces(text):
            ids += self._enc.encode_ordinary(piece)
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(ids)

    def token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(token_id)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, thinking: bool = True,
                            preserve_thinking: bool = False, **variables: Any) -> list[int]:
        """Prompt ids of a conversation (OpenAI-style message dicts; reasoning in `reasoning_content`).

        Only the template's own markup becomes special tokens: special-token text inside messages,
        tools or `variables` is encoded as plain text.
        """
        data = self._escaper.escape({"messages": messages, "tools": deep_sort(tools), **variables})
        text = compile_template(self.chat_template).render(
            **data, add_generation_prompt=add_generation_prompt, thinking=thinking,
            preserve_thinking=preserve_thinking)
        ids: list[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:
                ids.append(self.special[part])
            elif part:
                ids += self.encode(self._escaper.unescape(part))
        return ids


def _pieces(text: str):
    """`text` cut as Kimi's tokenizer cuts it before encoding."""
    for start in range(0, len(text), _MAX_CHARS):
        chunk = text[start:start + _MAX_CHARS]
        if len(chunk) <= _MAX_RUN:
            yield chunk
            continue
        begin, run, space = 0, 0, chunk[0].isspace()
        for i, ch in enumerate(chunk):
            if ch.isspace() != space:
                run, space = 1, not space
            else:
                run += 1
                if run > _MAX_RUN:
                    yield chunk[begin:i]
                    begin, run = i, 1
        yield chunk[begin:]
