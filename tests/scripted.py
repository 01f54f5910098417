"""A checkpoint that writes a fixed reply: the tiny preset with its embedding and head rewired
into a chain of bigrams (each token of the reply predicts the next, the last one `<|im_end|>`).

Real clients (Claude Code) keep asking until a turn ends; a random-weight model never ends one.
Each chain token gets its own embedding dimension, set far above the rest, so the last position's
hidden state points along it whatever the layers add, and the head maps that dimension to the
next token of the chain."""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hybrid.tokenizer import Tokenizer

EMBED, HEAD = 40.0, 10.0
REASONING, ANSWER = "Fine.", "Hello there!"  # what the client tests' model writes


def write_scripted(source: Path, folder: Path, reasoning: str, answer: str) -> Path:
    """Copy `source` to `folder`, rewired to reason `reasoning` after `<think>` and answer `answer`
    (each of distinct tokens), then end the turn."""
    if folder.exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    tok = Tokenizer.from_pretrained(tmp)
    sp = tok.special
    chain = [sp["<think>"], *tok.encode(reasoning), sp["</think>"], *tok.encode(answer), sp["<|im_end|>"]]
    assert len(set(chain[:-1])) == len(chain) - 1, "each token of the chain must be distinct"
    index = json.loads((tmp / "model.safetensors.index.json").read_text())["weight_map"]
    for name, scale in (("model.embed_tokens.weight", EMBED), ("lm_head.weight", HEAD)):
        path = tmp / index[name]
        tensors = load_file(path)
        w = tensors[name].float()
        w[:, :len(chain) - 1] = 0
        for d, (a, b) in enumerate(zip(chain, chain[1:])):
            w[a if name.startswith("model.") else b, d] = scale
        tensors[name] = w.to(torch.bfloat16)
        save_file(tensors, path, metadata={"format": "pt"})
    tmp.rename(folder)
    return folder
