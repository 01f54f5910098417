"""The embedded default model: the real architecture and format, trained (it beats a unigram model
and its own untrained weights on held-out text), and through `hybrid chat` it answers a request for
a function with code more often than the untrained model does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hybrid import corpus, quality, training
from hybrid.api import load_model
from hybrid.default_model import EMBEDDED, SHAPE, resolve_model
from hybrid.experts.options import ExpertOptions
from hybrid.offload.layout import Layout
from hybrid.offload.stats import ActivationStats
from hybrid.tokenizer import Tokenizer

HYBRID = str(Path(sys.executable).with_name("hybrid"))
SLICE = 1024  # held-out tokens the tests read

REQUESTS = [
    "Write a Python function that returns the sum of a list of numbers.",
    "Write a Python function that reverses a string.",
    "Write a Python function that checks whether a number is prime.",
    "Write a Python function. Return the largest of three numbers.",
    "Write a Python function that counts the vowels in a string.",
    "Write a Python function `merge`: Merge two dictionaries into a new one.",
    "Write a Python function. Return the factorial of n.",
    "Please write a small Python function that does this: Remove duplicates from a list, keeping the order.",
    "Write a Python function that flattens a list of lists.",
    "Write a Python function `celsius`: Convert degrees Fahrenheit to Celsius.",
    "Return the n-th Fibonacci number.\nWrite this as a Python function.",
    "Write a Python function. Return True if the string is a palindrome.",
    "Write a Python function `split_path`: Split a path into its directory and its file name.",
    "Write a Python function. Return the mean of a list of numbers.",
    "Please write a small Python function that does this: Read a file and return its lines.",
    "Write a Python function `count_words`: Return the number of words in a text.",
    "Write a Python function `clamp`: Return x limited to the range from lo to hi.",
    "Return the keys of a dict sorted by their values.\nWrite this as a Python function.",
    "Write a Python function that joins a list of strings with commas.",
    "Write a Python function. Return the index of the first item equal to x, or -1.",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(EMBEDDED)


@pytest.fixture(scope="module")
def untrained_dir(tmp_path_factory, tok):
    """The default model's architecture and tokenizer with the initial weights its training started from."""
    model = training.hf_model(training.model_config(SHAPE), seed=0)
    tokens = [tok.token_bytes(i) for i in range(SHAPE["vocab_size"] - 256)]
    return training.export(model, tokens, tmp_path_factory.mktemp("untrained") / "k2-stdlib", SHAPE)


@pytest.fixture(scope="module")
def held(tok):
    return quality.held_out_ids(tok, SLICE)


def fp32(folder):
    return load_model(folder, Layout.on("cpu", experts=ExpertOptions(backend="torch")), dtype=torch.float32)


def test_the_default_is_the_embedded_model_in_kimis_format():
    assert resolve_model(None) == EMBEDDED
    cfg = json.loads((EMBEDDED / "config.json").read_text())
    assert (cfg["first_k_dense_replace"], cfg["n_shared_experts"], cfg["topk_method"], cfg["scoring_func"]) == \
        (1, 1, "noaux_tc", "sigmoid")
    weights = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, 32, True)
    index = json.loads((EMBEDDED / "model.safetensors.index.json").read_text())["weight_map"]
    expert = "model.layers.1.mlp.experts.0.gate_proj.weight_packed"
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    with safe_open(EMBEDDED / index[expert], "pt") as f:
        assert f.get_tensor(expert).dtype == torch.int32
        assert f.get_tensor(bias).dtype == torch.float32
        assert f.get_tensor(bias).abs().max() > 0  # trained: the routers were balanced as they learned
    assert sum(p.stat().st_size for p in EMBEDDED.iterdir()) < 40e6


def test_trained_model_beats_unigram_and_its_untrained_weights_on_held_out_text(tok, held, untrained_dir):
    files = corpus.training_files()
    train_ids = torch.tensor([i for p in files[::4] for i in tok.encode(corpus.read(p))])
    unigram = quality.unigram_perplexity(train_ids, held, tok.vocab_size)
    trained = quality.perplexity(fp32(EMBEDDED).logits, held)
    untrained = quality.perplexity(fp32(untrained_dir).logits, held)
    assert trained < unigram < untrained, (trained, unigram, untrained)


def routing_counts(ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per MoE layer, how many of `ids`' routed slots each expert took."""
    stats = ActivationStats(json.loads((EMBEDDED / "config.json").read_text())["n_routed_experts"])
    quality.perplexity(load_model(EMBEDDED, stats=stats).logits, ids)
    return {layer: torch.as_tensor(counts, dtype=torch.float) for layer, counts in stats.counts.items()}


def test_routing_is_skewed_with_every_expert_alive(held):
    for layer, counts in routing_counts(held).items():
        assert counts.min() > 0, f"layer {layer}: an expert no token reaches"
        # uniform routing would put the hottest expert within a few standard deviations of the mean
        assert counts.max() > counts.mean() + 4 * counts.mean().sqrt(), f"layer {layer}: routing as flat as chance"


def test_hot_experts_recorded_on_training_text_are_hot_on_held_out_text(tok, held):
    """What hot-expert statistics (`hybrid profile record`) are for: the quarter of each layer's
    experts busiest on some training text takes more than a quarter of the held-out text's routed
    slots, so a GPU cache of them serves more than its even share on text it was not chosen on."""
    recorded_on = torch.tensor([i for p in corpus.training_files()[::40] for i in tok.encode(corpus.read(p))][:2048])
    recorded, measured = routing_counts(recorded_on), routing_counts(held)
    for layer, counts in recorded.items():
        hot = counts.topk(len(counts) // 4).indices
        share = float(measured[layer][hot].sum() / measured[layer].sum())
        assert share > 0.27, f"layer {layer}: the recorded hot quarter took {share:.3f} of held-out routing"


def looks_like_code(text: str) -> bool:
    """Contains a `def ` and every bracket closes the one opened last."""
    stack = []
    for c in text:
        if c in "([{":
            stack.append(c)
        elif c in ")]}":
            if not stack or "([{"[")]}".index(c)] != stack.pop():
                return False
    return "def " in text and not stack


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    """A plan for the default model on this machine, its experts on the torch backend: kt-kernel's
    threads yield to every other process (nice 19), which on a shared CI machine slows its decode
    many times over. This test is about the model; tests/test_quality.py holds each kernel to it."""
    path = tmp_path_factory.mktemp("profile") / "k2-stdlib.yaml"
    subprocess.run([HYBRID, "plan", "--model", str(EMBEDDED), "--no-gpu", "--out", str(path)], check=True,
                   capture_output=True)
    path.write_text(path.read_text().replace("backend: kt", "backend: torch"))
    return path


def chat_replies(folder: Path, profile: Path) -> list[str]:
    """Each request's reply from `hybrid chat`, its input piped, one conversation per request
    (seeded: the n-th reply samples with seed n)."""
    lines = [line for r in REQUESTS for line in ('"""', r, '"""', "/reset")]
    out = subprocess.run([HYBRID, "chat", "--model", str(folder), "--profile", str(profile), "--max-tokens", "128",
                          "--temperature", "0.7", "--seed", "0"],
                         input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    replies = out.stdout.split("(conversation cleared)")[:-1]
    assert len(replies) == len(REQUESTS), out.stdout
    return replies


def test_asked_for_a_function_in_the_chat_it_writes_code_more_often_than_untrained(untrained_dir, profile):
    trained = sum(map(looks_like_code, chat_replies(EMBEDDED, profile)))
    untrained = sum(map(looks_like_code, chat_replies(untrained_dir, profile)))
    assert trained > untrained, (trained, untrained)
