"""A byte-pair vocabulary learned from text, in tiktoken's rank order (what `tiktoken.model` holds).

Text is first cut with Kimi's own split pattern (`PAT_STR`, read by the `regex` module, whose V1
mode knows the pattern's class intersections), so merges never cross a boundary Kimi's tokenizer
keeps. The merges are learned by Hugging Face `tokenizers`' BPE trainer (installed with
transformers) over the pieces' bytes; rank 256 + i is the i-th merge, which is the order tiktoken
applies them in.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from hybrid.tokenizer.tokenizer import PAT_STR


def train_bpe(texts: Iterable[str], n_tokens: int) -> list[bytes]:
    """`n_tokens` base tokens (the 256 single bytes first), each the join of two earlier ones."""
    import regex
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    split = regex.compile(PAT_STR, flags=regex.V1)

    def pieces() -> Iterator[list[str]]:
        for text in texts:
            yield split.findall(text)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    # Some slack: a merge whose bytes an earlier merge already made adds no token here.
    trainer = trainers.BpeTrainer(vocab_size=n_tokens + 64, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(pieces(), trainer)
    byte_of = {c: b for b, c in _byte_chars().items()}
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    for merge in _merges(bpe):
        token = b"".join(bytes(byte_of[c] for c in part) for part in merge)
        if token not in seen:
            seen.add(token)
            tokens.append(token)
        if len(tokens) == n_tokens:
            return tokens
    raise ValueError(f"the text holds only {len(tokens)} distinct merges; ask for fewer tokens than {n_tokens}")


def _merges(bpe) -> list[tuple[str, str]]:
    import json

    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte-to-character map, which byte-level BPE trainers spell tokens in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
