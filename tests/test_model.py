"""The decoder against transformers' DeepseekV3ForCausalLM, on generated Kimi-format checkpoints."""

import pytest
import torch

from hybrid.api import load_model as _load_model
from hybrid.experts import ExpertOptions
from hybrid.scheduler.placement import Placement
from reference import load_reference
from conftest import VARIANTS


def load_model(folder, dtype=torch.bfloat16):
    """The model with the portable torch expert backend, which computes in the model's dtype."""
    return _load_model(folder, Placement.on("cpu", experts=ExpertOptions(backend="torch")), dtype=dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def prompt(vocab: int, n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, variant_dir, tmp_path):
    folder = variant_dir(variant)
    ours = load_model(folder, dtype=torch.float32)
    ref = load_reference(folder, tmp_path / "ref")
    ids = prompt(ours.config.vocab_size)
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    assert rel(ours.logits(ids), expected) <= 1e-4


def test_greedy_generation_matches_reference_and_cache_free_logits(tiny_dir, tmp_path):
    ours = load_model(tiny_dir, dtype=torch.float32)
    ref = load_reference(tiny_dir, tmp_path / "ref")
    ids = prompt(ours.config.vocab_size)
    tokens, step_logits = ours.generate(ids, 32, return_logits=True)
    expected = ref.generate(ids[None], max_new_tokens=32, min_new_tokens=32, do_sample=False)[0, 32:].tolist()
    assert tokens == expected
    full = torch.cat([ids, torch.tensor(tokens)])
    cache_free = ours.logits(full)[31:63]  # the logits that chose each generated token
    for step in range(32):
        assert rel(step_logits[step], cache_free[step]) <= 1e-4, f"step {step}"


def test_bf16_model_tracks_float32(tiny_dir):
    """The default dtype is bf16. With random weights its rounding flips some routing choices,
    which moves logits by ~0.1 relative; a broken bf16 path would be off by ~1."""
    ids = prompt(1280)
    exact = load_model(tiny_dir, dtype=torch.float32).logits(ids)
    fast = load_model(tiny_dir).logits(ids)
    assert rel(fast, exact) < 0.2
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.8
