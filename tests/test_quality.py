"""Every runtime path keeps the held-out perplexity of the embedded (trained) model within the
tolerance it documents (hybrid/quality.py), against the float32 path over the same tokens; on a
short slice of the held-out text, so the check stays fast (`python -m bench.quality` reads more).
Decode paths, one token a step (~45 ms a token on a 2-core CPU), read one window of it."""

import pytest
import torch

from hybrid import quality
from hybrid.default_model import EMBEDDED
from hybrid.model.attention import MLA
from hybrid.model.kv_cache import KVCache
from hybrid.tokenizer import Tokenizer

SLICE = 1024
DECODE_SLICE = quality.WINDOW


def text_of(path: quality.ComputePath, held: torch.Tensor) -> torch.Tensor:
    return held[:DECODE_SLICE] if path.decode else held


@pytest.fixture(scope="module")
def held():
    return quality.held_out_ids(Tokenizer.from_pretrained(EMBEDDED), SLICE)


@pytest.fixture(scope="module")
def float32(held):
    """The float32 path's perplexity over the first n tokens of `held`, by n."""
    model = quality.REFERENCE.load(EMBEDDED)
    return {n: quality.perplexity(model.logits, held[:n]) for n in (SLICE, DECODE_SLICE)}


@pytest.mark.parametrize("path", quality.PATHS, ids=lambda p: p.name)
def test_path_perplexity_within_its_tolerance(path, held, float32):
    if path.missing():
        pytest.skip(path.missing())
    text = text_of(path, held)
    ppl = quality.perplexity(path.logits_of(path.load(EMBEDDED)), text)
    reference = float32[len(text)]
    assert ppl <= reference * (1 + path.tolerance), f"{path.name}: {ppl:.3f} vs float32 {reference:.3f}"


def test_the_measure_sees_a_broken_path(held, float32):
    """A path whose experts are dropped (routed weights zeroed) moves far beyond any tolerance:
    perplexity is a measure these tests can fail on."""
    model = quality.REFERENCE.load(EMBEDDED)
    for experts in model.moe_experts():
        submit = experts.cpu.submit
        experts.cpu.submit = lambda hidden, ids, weights, submit=submit: submit(hidden, ids, weights * 0)
    broken = quality.perplexity(model.logits, held)
    assert broken > float32[SLICE] * (1 + max(p.tolerance for p in quality.PATHS))


def test_the_measure_sees_a_broken_decode_step(held, float32, monkeypatch):
    """A decode step that caches its token without the rope key (the token's position lost) moves
    the decode paths' perplexity far beyond any tolerance. Only one-token writes are broken, so this
    also shows the decode paths run decode steps, not one prefill. The native decode kernel writes
    its own cache rows: its new rows lose their rope key after it."""
    write, native = KVCache.write, MLA._native_decode

    def lossy(self, layer, slots, latent, k_rope):
        write(self, layer, slots, latent, k_rope if len(slots) > 1 else torch.zeros_like(k_rope))

    def lossy_native(self, x, cache, part, cos, sin):
        out = native(self, x, cache, part, cos, sin)
        tier = cache.tiers[self.layer][part.tier]
        tier.data[torch.stack([s[-1] for s in part.slots]) - tier.start, self.rank:] = 0
        return out

    monkeypatch.setattr(KVCache, "write", lossy)
    monkeypatch.setattr(MLA, "_native_decode", lossy_native)
    path = next(p for p in quality.PATHS if p.decode)
    broken = quality.perplexity(path.logits_of(path.load(EMBEDDED)), held[:DECODE_SLICE])
    assert broken > float32[DECODE_SLICE] * (1 + max(p.tolerance for p in quality.PATHS))
