"""A tokenizer in Kimi K2's on-disk format, for checkpoints made here (there is no model hub).

`tiktoken.model` holds the 256 single bytes, then byte-pair merges learned from a small English,
code and multilingual text (so common words are single tokens, as in a real vocabulary), then
deterministic pseudo-random merges of existing tokens up to the requested size. Every token is the
concatenation of two earlier ones, so it is a valid BPE vocabulary. `tokenizer_config.json` names the
specials as Kimi's does and carries the chat template.
"""

from __future__ import annotations

import base64
import json
import random
import re
from collections import Counter
from pathlib import Path

from hybrid.tokenizer.chat_template import KIMI_CHAT_TEMPLATE
from hybrid.tokenizer.specials import BOS, EOS, N_SPECIAL, OFFSETS

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A model that runs on the CPU and the GPU at the same time
has to decide, for every layer, where each expert lives. The router picks the experts for a token, and
the experts that are picked most often are kept in the memory of the GPU, while the others stay in the
memory of the host and are computed by the CPU. This is the idea of the hybrid runtime: the small part
that every token uses lives on the GPU, and the large part that each token uses only a little of lives
on the CPU. When a prompt is long, it is faster to copy the weights of the experts to the GPU than to
compute them on the CPU, because the GPU has much more compute and the link between them is fast.
Hello, world! How are you today? I am fine, thank you. What is the weather like in Paris? It is sunny
and warm, about 24 degrees. Please tell me a story about a dragon who learned to read books.
Questions and answers: what does the function return when the list is empty? It returns None.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 256 1024 2048 4096 65536 3.14159 2.71828 1e-6 0.5

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    result = []
    a, b = 0, 1
    for _ in range(n):
        result.append(a)
        a, b = b, a + b
    return result


class Request:
    def __init__(self, prompt: str, max_tokens: int = 128, temperature: float = 0.7):
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.temperature = temperature

    def __repr__(self) -> str:
        return f"Request(prompt={self.prompt!r}, max_tokens={self.max_tokens})"


import json
import os
from pathlib import Path

with open(os.path.join("data", "config.json")) as f:
    config = json.load(f)
if config.get("debug", False):
    print("debug mode is on")

function add(a, b) { return a + b; }
const items = [1, 2, 3].map((x) => x * 2).filter((x) => x > 2);
for (let i = 0; i < items.length; i++) { console.log(items[i]); }
SELECT name, count(*) FROM users WHERE age > 30 GROUP BY name ORDER BY name;
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
<div class="container"><p>Hello</p></div>
$ pip install torch && python -m pytest -q tests/

Le renard brun saute par-dessus le chien paresseux. Où est la gare ? Très bien, merci.
Der schnelle braune Fuchs springt über den faulen Hund. Grüße aus München.
El rápido zorro marrón salta sobre el perro perezoso. ¿Dónde está la estación?
Быстрая коричневая лиса прыгает через ленивую собаку. Привет, как дела?
敏捷的棕色狐狸跳过了懒狗。你好，世界！今天天气很好。人工智能模型在中央处理器和图形处理器上运行。
素早い茶色の狐がのろまな犬を飛び越える。こんにちは、世界。
빠른 갈색 여우가 게으른 개를 뛰어넘는다. 안녕하세요.
Emoji: 😀 🚀 ✨ 👍 — “quotes” ‘single’ … € £ ¥ ° ± × ÷ → ← ≤ ≥ ∑ ∫ π
"""

_WORD = re.compile(r"""'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d{1,3}| ?[^\s\w]+|\s+""")
_MAX_FILLER_BYTES = 32


def write_tokenizer(folder: Path, n_base_tokens: int, seed: int = 0) -> int:
    """Write `tiktoken.model` and `tokenizer_config.json` into `folder`; return the vocabulary size."""
    if n_base_tokens < 256:
        raise ValueError(f"n_base_tokens must be at least 256 (the single bytes), got {n_base_tokens}")
    return write_vocabulary(folder, _vocabulary(n_base_tokens, seed))


def write_vocabulary(folder: Path, tokens: list[bytes]) -> int:
    """Write `tokens` (in rank order, the 256 single bytes first) as the tokenizer files of `folder`,
    with Kimi's specials after them; return the vocabulary size."""
    n_base_tokens = len(tokens)
    folder = Path(folder)
    lines = [f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)]
    (folder / "tiktoken.model").write_text("".join(lines))
    (folder / "tokenizer_config.json").write_text(json.dumps(_config(n_base_tokens), indent=2, ensure_ascii=False))
    return n_base_tokens + N_SPECIAL


def _vocabulary(n: int, seed: int) -> list[bytes]:
    tokens = [bytes([b]) for b in range(256)]
    tokens += _learned_merges(n - len(tokens))
    seen = set(tokens)
    short = tokens[:]  # bytes and learned pieces: the right halves of filler merges
    rng = random.Random(seed)
    while len(tokens) < n:
        t = tokens[rng.randrange(len(tokens))] + short[rng.randrange(len(short))]
        if len(t) <= _MAX_FILLER_BYTES and t not in seen:
            seen.add(t)
            tokens.append(t)
    return tokens


def _learned_merges(limit: int) -> list[bytes]:
    """Byte-pair merges of the corpus, most frequent pair first, while a pair occurs twice or more."""
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in _WORD.findall(_CORPUS))
    merges: list[bytes] = []
    while len(merges) < limit:
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if count < 2:
            break
        merges.append(a + b)
        words = Counter({_merge(word, a, b): c for word, c in words.items()})
    return merges


def _merge(word: tuple[bytes, ...], a: bytes, b: bytes) -> tuple[bytes, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _config(n_base: int) -> dict:
    entry = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    decoder = {str(n_base + off): {"content": name, **entry} for name, off in OFFSETS.items()}
    return {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>"],
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": "[UNK]",
        "pad_token": "[PAD]",
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "TikTokenTokenizer",
        "chat_template": KIMI_CHAT_TEMPLATE,
    }
